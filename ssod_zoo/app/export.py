"""``ssod export``: an SSOD model from any source (a training checkpoint, a hub folder, ``local-dir:``/``hf-hub:``, a
tag, or an architecture with ``--checkpoint``) to one ONNX file, by :func:`ssod_zoo.export.export_onnx`::

    ssod export ssod_resnet50 --out ssod_resnet50.onnx [--checkpoint model.safetensors] [--input-size 3 224 224]
    ssod export runs/exp/best.pt --out model.onnx         # a training checkpoint: arch, weights, thresholds, size
    ssod export my_folder --out model.onnx                # a hub folder (ssod save), local-dir: or hf-hub: the same
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import timm
import torch
from timm.models import load_state_dict

from .. import hub
from ..adapter import SSODModel
from ..export import INPUT_NAME, _resolve_input_size, export_onnx
from .cli import AT_LEAST_1, bounded

__all__ = ['main']


def _num_classes_in(checkpoint: Union[str, Path], model_name: str) -> Optional[int]:
    """The class count a checkpoint was trained with, read from its classifier weight (None if not found)."""
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
