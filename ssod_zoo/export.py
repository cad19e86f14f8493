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

The command line, ``ssod export``, is :mod:`ssod_zoo.app.export`.
"""
import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapter import READOUTS, SSODModel, check_readout

__all__ = ['export_onnx', 'INPUT_NAME', 'OUTPUT_NAMES']

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
