"""ONNX export of SSOD models: one file with three named outputs, ``logits``, ``ood_factor`` and ``spatial_score``.

The graph is the model's :meth:`~ssod_zoo.SSODModel.forward_scores`, so the file carries every output whatever the
model's ``return_ood`` says, and it is traced in eval mode (BatchNorm running statistics, no dropout)::

    image: (batch, C, H, W) float  ->  logits: (batch, M),  ood_factor: (batch,) in [0, 1],  spatial_score: (batch,)

``spatial_score`` is the readout this project's study found to detect best; the metadata carry both calibrated
thresholds (``ssod_zoo.spatial_threshold``, ``ssod_zoo.ood_threshold``) where the model has them, and
``ssod_zoo.readout``, the output to decide with (``spatial_score`` or ``ood_factor``), where one was chosen for the
weights (``model.readout``).

Exporter: the ``torch.export``-based one (``torch.onnx.export(..., dynamo=True)``, the default since torch 2.9).
The legacy TorchScript exporter gives the same numbers for every registered architecture, but it is deprecated
(a DeprecationWarning on every call) and, when handed a wrapper in training mode, it flips the caller's model
back into training mode after export; the dynamo exporter leaves the model alone, emits a dynamic batch axis from
one ``Dim``, and is where ONNX export in torch is maintained. It is slower (seconds rather than a second).
Only an explicit ``opset`` below 18, which the dynamo exporter cannot write (it silently keeps 18), goes through
the TorchScript exporter.

``onnx`` and ``onnxscript`` are needed only here and are imported lazily: ``pip install 'ssod_zoo[export]'``.

Command line (``ssod export``)::

    ssod export ssod_resnet50 --out ssod_resnet50.onnx [--checkpoint model.safetensors] [--input-size 3 224 224]
    ssod export runs/exp/best.pt --out model.onnx         # a training checkpoint: arch, weights, thresholds, size
    ssod export my_folder --out model.onnx                # a hub folder (ssod save), local-dir: or hf-hub: the same
"""
import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapter import READOUTS, SSODModel, check_readout
from .app.cli import AT_LEAST_1, bounded

__all__ = ['export_onnx', 'main', 'INPUT_NAME', 'OUTPUT_NAMES']

INPUT_NAME = 'image'
OUTPUT_NAMES = ('logits', 'ood_factor', 'spatial_score')

# the dynamo exporter's lowest opset; below it, the TorchScript exporter writes the requested opset natively
_DYNAMO_MIN_OPSET = 18
# protobuf cannot hold a file over 2 GiB; above this the weights go to a side file ``<path>.data``
_EXTERNAL_DATA_BYTES = 1_800_000_000


class _SSODGraph(nn.Module):
    """``forward_scores`` as a plain tuple: what the exporter traces. The argument name becomes the input's name."""

    def __init__(self, model: SSODModel):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.model.forward_scores(image))


def _require_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter translates through it)
    except ImportError as e:  # ModuleNotFoundError, with the module's name: `ssod export` makes it one line
        raise ModuleNotFoundError(f'ONNX export needs the onnx and onnxscript packages ({e.name} is missing); '
                                  "install them with: pip install 'ssod_zoo[export]'", name=e.name) from e
    return onnx


def _resolve_input_size(model: SSODModel, input_size: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    if input_size is None:
        input_size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3, 224, 224)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ValueError(f'input_size is (C, H, W) with positive sizes, got {input_size}')
    in_chans = getattr(model, 'in_chans', None)
    if in_chans is not None and input_size[0] != in_chans:
        raise ValueError(f'input_size {input_size} has {input_size[0]} channels but the model takes {in_chans}')
    return input_size  # type: ignore[return-value]


def _export_torchscript(graph: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
                        onnx: Any, metadata: Dict[str, str]) -> None:
    """Opsets below 18, for older runtimes: the dynamo exporter would fall back to opset 18 with a warning."""
    import warnings

    axes = {name: {0: 'batch'} for name in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None
    with warnings.catch_warnings():
        # chosen on purpose for old opsets; the tracer's notes are about _check_input's shape checks, which
        # belong to eager mode and are not part of the graph
        warnings.simplefilter('ignore', DeprecationWarning)
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=axes)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


def _calibrated_elsewhere(model: SSODModel, size: Tuple[int, ...]) -> Optional[Tuple[int, int, int]]:
    """The input size the model's thresholds were calibrated at, when it is known (they are the ones it was loaded
    with: :func:`ssod_zoo.hub.loaded_calibration_size`) and is not ``size``; else None."""
    from .hub import loaded_calibration_size
    calibrated = loaded_calibration_size(model)
    return calibrated if calibrated is not None and calibrated != tuple(size) else None


def _left_out(model: SSODModel, size: Tuple[int, ...]) -> Tuple[List[str], Optional[Tuple[int, int, int]]]:
    """The thresholds the model was loaded with, when they were calibrated at another input size than ``size``
    (:func:`ssod_zoo.hub.still_loaded`), left out of an export at ``size``, and that size; ``([], None)`` else."""
    from .hub import still_loaded
    calibrated = _calibrated_elsewhere(model, size)
    return (still_loaded(model), calibrated) if calibrated is not None else ([], None)


def _metadata(model: SSODModel, input_size: Tuple[int, int, int]) -> Dict[str, str]:
    """What a deployment needs beside the graph: preprocessing, class count and the calibrated thresholds."""
    from . import __version__

    cfg = getattr(model, 'pretrained_cfg', None) or {}
    meta = {
        'ssod_zoo.version': __version__,
        'ssod_zoo.architecture': str(cfg.get('architecture', type(model).__name__)),
        'ssod_zoo.num_classes': str(model.num_classes),
        'ssod_zoo.input_size': json.dumps(list(input_size)),
        'ssod_zoo.outputs': 'logits: (batch, num_classes); ood_factor: (batch,) in [0, 1] and spatial_score: '
                            '(batch,), higher = more in-distribution; reject where ood_factor < ood_threshold, or '
                            'spatial_score < spatial_threshold (the readout that detected best in ssod_zoo\'s study)',
    }
    for key in ('mean', 'std', 'interpolation', 'crop_pct'):
        if cfg.get(key) is not None:
            meta[f'ssod_zoo.{key}'] = json.dumps(cfg[key])
    left_out, calibrated = _left_out(model, input_size)  # the weights' own thresholds, calibrated elsewhere
    held = [r.attribute for r in READOUTS.values() if getattr(model, r.attribute, None) is not None]
    if left_out:  # both scores are other numbers at this size
        which = 'none' if set(held) <= set(left_out) else ' and '.join(left_out) + ' left out'
        meta['ssod_zoo.thresholds'] = (f'{which}: calibrated at input size {list(calibrated)}, not valid at '
                                       f'{list(input_size)}; calibrate them at this size, then export')
    for key in held:
        if key not in left_out:  # thresholds set by hand or passed by the caller: for the size the caller meant
            meta[f'ssod_zoo.{key}'] = repr(float(getattr(model, key)))
    readout = getattr(model, 'readout', None)
    if readout and READOUTS[check_readout(readout)].attribute not in left_out:  # decide with its score
        meta['ssod_zoo.readout'] = READOUTS[readout].score
    if not getattr(model, 'ood_head_trained', True):  # a cross-entropy model: its ood_factor output is NaN
        meta['ssod_zoo.ood_head_trained'] = 'false'
    labels = cfg.get('label_names')
    if labels and len(labels) == model.num_classes:  # logits column i is label_names[i]
        meta['ssod_zoo.label_names'] = json.dumps([str(c) for c in labels])
    return meta


def export_onnx(
        model: SSODModel,
        path: Union[str, Path],
        *,
        input_size: Optional[Sequence[int]] = None,
        batch_size: int = 1,
        opset: Optional[int] = None,
        dynamic_batch: bool = True,
) -> Path:
    """Write an SSOD model as ONNX with input ``image`` and outputs ``logits``, ``ood_factor`` and ``spatial_score``.

    The graph is ``forward_scores`` in eval mode, whatever the model's ``return_ood`` and training mode are; the
    model's own mode is restored afterwards. The file is checked with ``onnx.checker`` (full check, with shape
    inference) before this returns, and carries the model's mean/std, input size and thresholds as
    ``ssod_zoo.*`` metadata properties.

    Args:
        model: an SSOD model (``timm.create_model('ssod_resnet50')`` or ``ssod_zoo.wrap(...)``).
        path: the ``.onnx`` file to write; parent folders are created.
        input_size: (C, H, W) of the example input; default: the model's ``pretrained_cfg['input_size']``.
            Height and width are fixed in the graph.
        batch_size: batch size of the example input (at least 2 with ``dynamic_batch``, which torch.export needs),
            and of the graph if ``dynamic_batch`` is False.
        opset: ONNX opset; default: the dynamo exporter's (20 with torch 2.14). Opsets below 18, for older
            runtimes, are written by the TorchScript exporter, which emits them natively.
        dynamic_batch: make axis 0 of the input and of every output the symbolic dimension ``batch``.

    Returns:
        The path written.

    Raises:
        TypeError: ``model`` is not an SSOD model.
        ImportError: onnx/onnxscript are not installed (``pip install 'ssod_zoo[export]'``).
        RuntimeError: the export or the check of the written file failed.
    """
    if not isinstance(model, SSODModel):
        raise TypeError(f'export_onnx() needs an SSOD model, got {type(model).__name__}; create one with '
                        "timm.create_model('ssod_resnet50') or ssod_zoo.wrap(model)")
    onnx = _require_onnx()
    if int(batch_size) < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    size = _resolve_input_size(model, input_size)
    ref = next(model.parameters())
    model._check_input(torch.empty(1, *size, device='meta', dtype=ref.dtype))  # a size it cannot take, first
    left_out, calibrated = _left_out(model, size)
    if left_out:
        warnings.warn(f'export_onnx: input size {size}, and the weights\' {" and ".join(left_out)} were calibrated '
                      f'at {calibrated}, where both scores are other numbers: the file '
                      'carries none of them. To calibrate at this size: load the '
                      f'model with pretrained_cfg_overlay=dict(input_size={size}), set model.spatial_threshold = '
                      'ssod_zoo.calibrate_threshold(model.spatial_score(id_images)) (and ood_threshold from '
                      'ood_factor), then export it', stacklevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    was_training = model.training  # before the wrapper's eval(), which reaches the model too
    # a dynamic batch axis is traced at batch 2 at least: torch.export specialises an example dimension of 1, and
    # then refuses to make it dynamic (ConvNeXt: "Invalid ranges [2:1]")
    example = torch.randn(max(int(batch_size), 2) if dynamic_batch else int(batch_size), *size, device=ref.device,
                          dtype=ref.dtype)
    model._check_input(example)  # a size the network cannot take fails here with its reason, not deep in the exporter
    dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim('batch')}} if dynamic_batch else None
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES

    try:
        graph = _SSODGraph(model).eval()
        with torch.no_grad():
            if opset is not None and opset < _DYNAMO_MIN_OPSET:
                _export_torchscript(graph, example, path, opset, dynamic_batch, onnx, _metadata(model, size))
            else:
                program = torch.onnx.export(
                    graph, (example,), None, dynamo=True, verbose=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes)
                program.model.metadata_props.update(_metadata(model, size))
                program.save(path, external_data=big)
    except Exception as e:
        raise RuntimeError(f'ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}') from e
    finally:
        model.train(was_training)

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise RuntimeError(f'the exported file {path} does not pass onnx.checker: {e}') from e
    proto = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
        raise RuntimeError(f'the exported file {path} has inputs {inputs} and outputs {outputs}; '
                           f'expected [{INPUT_NAME!r}] and {list(OUTPUT_NAMES)}')
    written = next((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), None)
    if opset is not None and written != opset:
        raise RuntimeError(f'asked for opset {opset}, but {path} has opset {written}')
    return path


# ---------------------------------------------------------------------------------------------------------------
# command line: ssod export


def _num_classes_in(checkpoint: Union[str, Path], model_name: str) -> Optional[int]:
    """The class count a checkpoint was trained with, read from its classifier weight (None if not found)."""
    import timm
    from timm.models import load_state_dict

    classifier = timm.models.get_pretrained_cfg_value(model_name, 'classifier') or ''
    try:
        state_dict = load_state_dict(str(checkpoint))
    except Exception:
        return None
    weight = state_dict.get(f'{classifier}.weight')
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 2 else None


def _read_checkpoint(checkpoint: Path) -> Optional[dict]:
    """The checkpoint as a dict (``torch.load(weights_only=True)``), or None for safetensors or unreadable files."""
    if checkpoint.suffix == '.safetensors':
        return None
    try:
        ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) else None


def _build_model(spec: str, checkpoint: Optional[str], num_classes: Optional[int],
                 pretrained: bool = False) -> SSODModel:
    """The model to export.

    Without ``--checkpoint``, ``spec`` is anything :func:`ssod_zoo.load_model` takes (a training checkpoint, a hub
    folder or ``local-dir:``, ``hf-hub:``, a registered tag with ``--pretrained``), so the model comes with its
    threshold and the preprocessing it was trained with; a bare architecture name gives fresh weights. With
    ``--checkpoint``, ``spec`` names the architecture and the file holds its weights (a training checkpoint, or
    timm-format ``.pth``/``.safetensors``).
    """
    import timm

    from . import hub

    if Path(spec).is_file():
        if checkpoint is not None:
            raise SystemExit(f'ssod export: error: {spec} is a file and --checkpoint {checkpoint} was given too; give '
                             'the architecture as MODEL (e.g. ssod_resnet50) and the weights as --checkpoint')
        ckpt = _read_checkpoint(Path(spec))
        if ckpt is None or ckpt.get('format') != hub.CHECKPOINT_FORMAT:  # timm's train.py names it as 'arch'
            name = next((ckpt[k] for k in ('arch', 'architecture') if isinstance((ckpt or {}).get(k), str)), None)
            if name is None:
                raise SystemExit(f'ssod export: error: {spec} does not say which architecture it holds; give it as '
                                 f'`ssod export ARCH --checkpoint {spec}`, ARCH from timm.list_models("ssod_*")')
            spec, checkpoint = name, spec
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise SystemExit(f'ssod export: error: checkpoint {checkpoint} not found')
        ckpt = _read_checkpoint(Path(checkpoint))
        if ckpt is not None and ckpt.get('format') == hub.CHECKPOINT_FORMAT:
            if spec.split('.')[0] != ckpt.get('architecture'):
                raise SystemExit(f'ssod export: error: {checkpoint} holds {ckpt.get("architecture")}, not {spec}')
            spec, checkpoint = checkpoint, None
    tagged = '.' in spec and spec in timm.list_pretrained(spec)  # 'arch.tag' names weights
    if checkpoint is None and (pretrained or tagged or Path(spec).exists()
                               or spec.startswith(('hf-hub:', 'local-dir:'))):
        try:
            model = hub.load_model(spec)
        except (RuntimeError, FileNotFoundError) as e:  # WeightsError, or a tag without weights
            raise SystemExit(f'ssod export: error: {e}') from e
        _check_classes(num_classes, model.num_classes, spec)
        return model
    if not hub.registered(spec):
        raise SystemExit(f'ssod export: error: unknown model {spec!r}; SSOD models: '
                         f'{", ".join(timm.list_models("ssod_*"))}')
    kwargs: Dict[str, Any] = {}
    if checkpoint is not None:
        found = _num_classes_in(checkpoint, spec)
        if found is not None:
            _check_classes(num_classes, found, checkpoint)
            num_classes = found
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    try:
        model = timm.create_model(spec, checkpoint_path=checkpoint or '', **kwargs)
    except RuntimeError as e:  # torch's load_state_dict: a line per missing, unexpected or mis-sized key
        if checkpoint is None or 'Error(s) in loading state_dict' not in str(e):
            raise
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        first = problems[0] if len(problems[0]) <= 160 else problems[0][:157] + '...'
        raise SystemExit(f'ssod export: error: --checkpoint {checkpoint} does not fit {spec}: {first}'
                         f'{f" (and {len(problems) - 1} more problems)" * (len(problems) > 1)}; '
                         'give the architecture it was saved from as MODEL, or its hub folder or training checkpoint '
                         'alone') from None
    if not isinstance(model, SSODModel):
        raise SystemExit(f'ssod export: error: {spec} is not an SSOD model; use one of '
                         f'{", ".join(timm.list_models("ssod_*"))}, a folder or checkpoint of a trained one, or wrap '
                         'your own with ssod_zoo.wrap() and call ssod_zoo.export.export_onnx()')
    if checkpoint is None:
        print(f'note: {spec} has fresh, untrained weights; give a training checkpoint, a hub folder, --checkpoint '
              f'FILE or --pretrained with a tag ({", ".join(timm.list_pretrained("ssod_*")) or "none published"}) '
              'to export trained ones', file=sys.stderr)
    elif (Path(checkpoint).parent / 'config.json').is_file():
        print(f'note: {checkpoint} lies in a hub folder; `ssod export {Path(checkpoint).parent}` also takes the input '
              'size, preprocessing and threshold it was saved with (here: the architecture\'s defaults, or '
              '--input-size)', file=sys.stderr)
    return model


def _check_classes(asked: Optional[int], found: int, source: str) -> None:
    if asked is not None and asked != found:
        raise SystemExit(f'ssod export: error: {source} has {found} classes, not --num-classes {asked}; the weights '
                         'fix the class count, so leave --num-classes out')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='ssod export',
        description='Export an SSOD model to ONNX: input "image" (batch, C, H, W), outputs "logits" '
                    '(batch, num_classes), "ood_factor" (batch,) and "spatial_score" (batch,).')
    p.add_argument('model', metavar='MODEL',
                   help='a checkpoint written by `ssod train`, a hub folder (`ssod save`) or local-dir:/hf-hub: spec '
                        '(architecture, weights, thresholds and input size come from it), or an architecture '
                        'name, e.g. ssod_resnet50')
    p.add_argument('--out', required=True, type=Path, help='the .onnx file to write')
    p.add_argument('--checkpoint', default=None,
                   help='weights to load into MODEL: a ssod_zoo.app.train checkpoint, or timm-format .pth/.safetensors')
    p.add_argument('--pretrained', action='store_true',
                   help='load the published SSOD weights of MODEL (e.g. ssod_resnet50.<tag>; see '
                        'timm.list_pretrained("ssod_*"))')
    p.add_argument('--input-size', nargs=3, type=bounded(int, *AT_LEAST_1), default=None, metavar=('C', 'H', 'W'),
                   help="input size fixed in the graph (default: the model's pretrained_cfg input_size)")
    p.add_argument('--num-classes', type=bounded(int, *AT_LEAST_1), default=None,
                   help='class count (default: read from --checkpoint, else the model default)')
    p.add_argument('--batch-size', type=bounded(int, *AT_LEAST_1), default=1,
                   help='batch size of the example input; a dynamic batch is traced at 2 at least (default: 1)')
    p.add_argument('--static-batch', action='store_true', help='fix the batch axis to --batch-size')
    p.add_argument('--opset', type=bounded(int, *AT_LEAST_1), default=None,
                   help="ONNX opset (default: the exporter's)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``ssod export``: parse ``argv`` (default ``sys.argv[1:]``), write the ONNX file, print where it went."""
    p = _parser()
    args = p.parse_args(argv)
    if args.pretrained and args.checkpoint:
        p.error('--pretrained loads published weights and --checkpoint loads a file: give one of them')
    model = _build_model(args.model, args.checkpoint, args.num_classes, args.pretrained)
    try:
        path = export_onnx(model, args.out, input_size=args.input_size, batch_size=args.batch_size,
                           opset=args.opset, dynamic_batch=not args.static_batch)
    except ValueError as e:  # an input size the model cannot take
        raise SystemExit(f'ssod export: error: {e}') from e
    size = _resolve_input_size(model, args.input_size)
    batch = str(args.batch_size) if args.static_batch else 'batch'
    print(f'wrote {path}: {INPUT_NAME} ({batch}, {", ".join(map(str, size))}) -> '
          f'logits ({batch}, {model.num_classes}), ood_factor ({batch},), spatial_score ({batch},)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
