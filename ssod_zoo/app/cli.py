"""The ``ssod`` command: one entry point, one module per sub-command.

    ssod demo   --out DIR            the embedded benchmark end to end (ssod_zoo.app.demo)
    ssod train  ...                  fine-tune a timm classifier into an SSOD model (ssod_zoo.app.train)
    ssod eval   ...                  SSOD vs post-hoc baselines on your ImageFolder data (ssod_zoo.app.evaluate)
    ssod predict MODEL INPUTS...     class or "unknown" for each image, as CSV/JSON lines (ssod_zoo.app.predict)
    ssod calibrate MODEL --val-dir D the rejection thresholds, set on your own ID images (ssod_zoo.app.calibrate)
    ssod export MODEL --out F.onnx   ONNX: outputs logits, ood_factor, spatial_score (ssod_zoo.app.export)
    ssod save   CHECKPOINT DIR       a hub-ready folder from a training checkpoint (ssod_zoo.app.publish)
    ssod push   CHECKPOINT REPO_ID   the same, uploaded to the Hugging Face Hub (ssod_zoo.app.publish)
    ssod release RUN_DIR OUT ...     evaluate, calibrate, card and (--repo-id) push a run (ssod_zoo.app.release)
"""
import argparse
import importlib
import math
import sys
import warnings
from typing import Callable, List, Optional

COMMANDS = {
    'demo': ('ssod_zoo.app.demo', 'the embedded benchmark end to end: the shipped SSOD and CE models (--retrain '
                                  'trains both), every baseline, plots'),
    'train': ('ssod_zoo.app.train', 'fine-tune a timm classifier into an SSOD model (single process or torchrun)'),
    'eval': ('ssod_zoo.app.evaluate', 'SSOD against MSP/Energy/ODIN/ReAct/KNN/Mahalanobis/ViM on your data'),
    'predict': ('ssod_zoo.app.predict', 'class or "unknown" for each image of files, folders or globs (CSV/JSONL)'),
    'calibrate': ('ssod_zoo.app.calibrate', 'set the rejection thresholds on your own in-distribution images'),
    'export': ('ssod_zoo.app.export', 'export to ONNX with outputs logits, ood_factor and spatial_score'),
    'save': ('ssod_zoo.app.publish', 'write a hub-ready folder (safetensors, config.json, model card)'),
    'push': ('ssod_zoo.app.publish', 'upload a checkpoint to the Hugging Face Hub'),
    'release': ('ssod_zoo.app.release', 'a training run to an evaluated, calibrated, carded hub folder (and push)'),
}


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (['--version'], ['-V']):
        from .. import __version__
        import timm
        import torch
        print(f'ssod_zoo {__version__} (timm {timm.__version__}, torch {torch.__version__})')
        raise SystemExit(0)
    if not argv or argv[0] in ('-h', '--help'):
        width = max(map(len, COMMANDS))
        lines = [f'  {name:<{width}}  {help_}' for name, (_, help_) in COMMANDS.items()]
        print('usage: ssod COMMAND [ARGS]   (ssod COMMAND --help for its options; ssod --version)\n\ncommands:\n'
              + '\n'.join(lines))
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f'ssod: unknown command {command!r}; one of: {", ".join(COMMANDS)}', file=sys.stderr)
        raise SystemExit(2)
    _require_extra(command, rest)
    # warnings as one line each, like the errors, without Python's file:line and echoed source line
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f'ssod {command}: warning: {message}\n'
    try:
        module = importlib.import_module(COMMANDS[command][0])
        # the hub module takes its sub-command as the first argument (save / push)
        module.main([command, *rest] if command in ('save', 'push') else rest)
    except ModuleNotFoundError as e:  # a training-only dependency imported late, on a path not checked above
        top = (e.name or '').split('.')[0]
        if top not in _EXTRA_OF:
            raise
        _missing_extra(command, top)
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever the work was (ssod train saves
        # a checkpoint on the first signal and stops here on a second)
        print(f'ssod {command}: interrupted', file=sys.stderr)
        raise SystemExit(130)
    finally:
        warnings.formatwarning = formatwarning


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default after its help where the help does not already
    give it and the default says something (not None, False or '')."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        silent = action.default is None or action.default is False or action.default in ('', argparse.SUPPRESS)
        if 'default' in text or silent or not action.option_strings:
            return text
        return f'{text} (default: %(default)s)'.strip()


def range_error(value, accepts: Callable[[float], bool], what: str) -> Optional[str]:
    """Why ``value`` is refused ('must be a finite number', 'must be >= 1'), or None: the check shared by the flags
    (:func:`bounded`) and API callers (``ssod_zoo.app.train.train``). 'inf' and 'nan' parse as floats, and inf
    passes a bare '>= 0'."""
    if isinstance(value, float) and not math.isfinite(value):
        return 'must be a finite number'
    return None if accepts(value) else f'must be {what}'


def bounded(kind: type, accepts: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse ``type``: ``kind(text)``, refused at parsing ("argument --gamma: must be in (0.5, 1], got 1.5")
    unless ``accepts`` it, so that a bad value costs one line before any work, not a traceback after it."""
    def convert(text: str):
        value = kind(text)
        error = range_error(value, accepts, what)
        if error:
            raise argparse.ArgumentTypeError(f'{error}, got {text}')
        return value
    convert.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return convert


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: the name of a torch device this machine has (kept as text, as the
    commands record their arguments in JSON), refused at parsing otherwise."""
    import torch
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f'{e}; e.g. cpu, cuda or cuda:1') from e
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f'{text}: torch sees no CUDA device on this machine; use --device cpu')
    return text


AT_LEAST_1 = (lambda v: v >= 1, '>= 1')
AT_LEAST_0 = (lambda v: v >= 0, '>= 0')
POSITIVE = (lambda v: v > 0, '> 0')
# a centre crop's fraction: timm's pretrained configs use 0.875 to 1.15; far outside, an image is scaled to a
# sliver of the input (above) or to hundreds of times its size (below)
CROP_PCT = (lambda v: 0.5 <= v <= 1.5, "in [0.5, 1.5] (timm's pretrained configs use 0.875 to 1.15)")


# what application commands import beyond the library, and the extra that installs it (tqdm and pillow come
# with huggingface_hub and torchvision too, so in practice matplotlib is what a plain `pip install` lacks)
_EXTRA_OF = {'tqdm': 'train', 'matplotlib': 'train', 'PIL': 'train', 'numpy': 'train',
             'onnx': 'export', 'onnxscript': 'export'}
_NEEDS = {'demo': ('matplotlib',), 'eval': ('matplotlib',), 'release': ('matplotlib',)}  # their plots


def _require_extra(command: str, rest: List[str]) -> None:
    """Check before a long run starts, not when its last stage (the demo's plots) first imports the module."""
    for name in _NEEDS.get(command, ()) if '--no-plots' not in rest else ():
        try:
            importlib.import_module(name)
        except ImportError:
            _missing_extra(command, name)


def _missing_extra(command: str, module: str) -> None:
    extra = _EXTRA_OF[module]
    print(f"ssod {command}: error: needs {module}, which is in the [{extra}] extra: pip install 'ssod_zoo[{extra}]'",
          file=sys.stderr)
    raise SystemExit(2)


if __name__ == '__main__':
    main()
