r"""From a finished training run to an evaluated, calibrated, carded, hub-ready folder (pushed when asked).

    ssod release runs/fmnist_ssod releases/ssod_resnet18.fmnist --protocol fashion-mnist \
        --data-root /usr/share/datasets/fashion-mnist --baseline-run runs/fmnist_ce \
        --baseline-out releases/resnet18_fmnist_ce --dtype float16 [--repo-id ORG/NAME --token TOKEN]

1. Loads the run's ``best.pt`` (``last.pt`` if there is none) and, with ``--dtype float16``, rounds every weight
   to float16 first, so that every number below is measured on exactly the tensors that are shipped.
2. Calibrates both thresholds (``spatial_threshold``, ``ood_threshold``) on the protocol's ID *validation* split
   (95% of ID images kept), and ``spatial_threshold`` of ``--baseline-run``'s model too.
3. Writes the hub-ready folder (``config.json`` with the thresholds, ``model.safetensors``, ``README.md``).
4. Evaluates that folder on the protocol's *test* sets with ``ssod eval`` (SSOD, and the 8 post-hoc baselines on
   ``--baseline-run``'s model, itself written to ``--baseline-out``): ``OUT/eval/results.{json,md}`` and plots.
   So ``ssod eval --protocol P --model OUT --baseline-model BASELINE_OUT`` reproduces them.
5. Rewrites the model card with those numbers in its ``model-index``, and writes ``RUN_DIR/release.pt`` (the
   checkpoint with the rounded weights, thresholds and test metrics) for ``weights/add_weight.py``.
6. With ``--repo-id``, uploads the folder to the Hugging Face Hub (``--token`` or the logged-in token).
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._card import ood_head_trained
from ..hub import THRESHOLDS, WEIGHTS_NAME, load_checkpoint, push_folder, save_pretrained, write_card
from .evaluate import calibrate
from .protocols import PROTOCOLS, DataMissing, Transformed, load_protocol

__all__ = ['release', 'main']

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


class ReleaseError(Exception):
    """A problem with the user's input: one line at the CLI."""


def round_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round every floating parameter and buffer to ``dtype`` and back, in place: the model stays float32 but holds
    exactly the values a ``dtype`` file stores, so what is measured on it is what the shipped file gives."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return model


def store_as(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite ``folder/model.safetensors`` with floating tensors in ``dtype`` (refused unless lossless)."""
    from safetensors.torch import load_file, save_file
    path = folder / WEIGHTS_NAME
    tensors = load_file(str(path))
    out = {}
    for k, v in tensors.items():
        if v.is_floating_point():
            w = v.to(dtype)
            if not torch.equal(w.to(v.dtype), v):
                raise ReleaseError(f'{k} is not exactly representable in {dtype}; round the model first')
            v = w
        out[k] = v.contiguous()
    save_file(out, str(path), metadata={'format': 'pt'})


def _checkpoint(run: Path) -> Path:
    for name in ('best.pt', 'last.pt'):
        if (run / name).is_file():
            return run / name
    raise ReleaseError(f'{run} has no best.pt or last.pt; give the --out-dir of a finished `ssod train` run')


def _write(model: nn.Module, ckpt: dict, out: Path, dtype: torch.dtype) -> None:
    save_pretrained(model, out, train_config=ckpt.get('config'), metrics={}, class_names=ckpt.get('class_names'))
    if dtype != torch.float32:
        store_as(out, dtype)


def _calibrate(model: nn.Module, ckpt: dict, val: DataLoader, device: str) -> None:
    """Both thresholds on the validation loader, on ``device`` (the model is moved there and back to the CPU, where
    it is written); none on ``ood_factor`` for a cross-entropy twin."""
    thresholds = calibrate(model.to(device), val, torch.device(device), ood_head_trained({}, ckpt.get('config')))
    model.cpu()
    for k, v in thresholds.items():
        setattr(model, k, v)


def release(run_dir: str, out: str, protocol: str, data_root: Optional[str] = None, download: bool = False,
            openood_root: Optional[str] = None, baseline_run: Optional[str] = None, baseline_out: Optional[str] = None,
            dtype: str = 'float32', fit_limit: int = 0, limit: int = 0, batch_size: int = 64, workers: int = 2,
            device: str = 'cpu', repo_id: Optional[str] = None, token: Optional[str] = None, private: bool = False,
            api: Any = None) -> Dict[str, Any]:
    """Steps 1-6 of the module docstring. Returns ``{'ood_threshold', 'spatial_threshold', 'metrics', 'results',
    'out', 'seconds'}``."""
    import timm
    from . import evaluate as ev
    t0 = time.time()
    run, out_dir, torch_dtype = Path(run_dir), Path(out), DTYPES[dtype]
    if baseline_run and not baseline_out:
        raise ReleaseError('--baseline-run needs --baseline-out: `ssod eval` reproduces the numbers from that folder')
    source = _checkpoint(run)  # the user's own run first: a typo there should not wait for the data
    data = load_protocol(protocol, data_root, download, split='train', openood_root=openood_root)
    if data.val is None:
        raise ReleaseError(f'the {protocol} protocol has no ID validation split to calibrate the thresholds on')
    model, ckpt = load_checkpoint(source)
    round_weights(model, torch_dtype)
    if len(data.classes) != model.num_classes:
        raise ReleaseError(f'{source} has {model.num_classes} classes, the {protocol} protocol {len(data.classes)}')

    # calibration: the ID validation split (never the test split the card reports)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    val = DataLoader(Transformed(data.val, transform), batch_size=batch_size, num_workers=workers)
    _calibrate(model, ckpt, val, device)
    _write(model, ckpt, out_dir, torch_dtype)
    if baseline_run:
        base, base_ckpt = load_checkpoint(_checkpoint(Path(baseline_run)))
        round_weights(base, torch_dtype)
        _calibrate(base, base_ckpt, val, device)
        _write(base, base_ckpt, Path(baseline_out), torch_dtype)

    # evaluation of the written folders, through the same command a user runs
    argv = ['--model', str(out_dir), '--protocol', protocol, '--out', str(out_dir / 'eval'),
            '--batch-size', str(batch_size), '--workers', str(workers), '--device', device,
            '--fit-limit', str(fit_limit)]
    argv += ['--data-root', data_root] if data_root else []
    argv += ['--openood-root', openood_root] if openood_root else []
    argv += ['--baseline-model', str(baseline_out)] if baseline_run else []
    argv += ['--limit', str(limit)] if limit else []
    results = ev.main(argv)  # what it wrote to eval/results.json
    ssod = {s: r['ssod'] for s, r in results['ood'].items() if s != 'average'}
    metrics = {'id_accuracy': results['id_accuracy']['ssod'], 'ood': ssod, 'ood_average': results['ood']['average']['ssod'],
               'id_dataset': f'the {protocol} protocol\'s ID classes', 'protocol': protocol, 'split': 'test',
               **{k: v for k, v in (ckpt.get('metrics') or {}).items() if k in ('epoch', 'epochs', 'chosen_on')}}
    write_card(out_dir, train_config=ckpt.get('config'), metrics=metrics)  # the card now carries the test numbers

    release_ckpt = {**ckpt, 'model': model.state_dict(), **{k: getattr(model, k) for k in THRESHOLDS},
                    'metrics': metrics,
                    'release': {'protocol': protocol, 'dtype': dtype, 'source': str(source), 'fit_limit': fit_limit,
                                'limit': limit}}
    torch.save(release_ckpt, run / 'release.pt')
    if repo_id:
        push_folder(out_dir, repo_id, token=token, private=private, api=api,
                    commit_message='SSOD weights, evaluated and calibrated by `ssod release`')
    return {'ood_threshold': model.ood_threshold, 'spatial_threshold': model.spatial_threshold, 'metrics': metrics,
            'results': results, 'out': str(out_dir),
            'seconds': time.time() - t0}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog='ssod release', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run_dir', help='the --out-dir of a finished `ssod train` run (best.pt or last.pt)')
    p.add_argument('out', help='the hub-ready folder to write')
    p.add_argument('--protocol', choices=PROTOCOLS,
                   help="the named protocol the run trained on (ssod train --data <protocol>), required; a run on "
                        "your own folders (--data folder) is released with ssod save, ssod calibrate --ood-dirs and "
                        "ssod eval instead")
    p.add_argument('--data-root')
    p.add_argument('--download', action='store_true')
    p.add_argument('--openood-root')
    p.add_argument('--baseline-run', help='the cross-entropy twin run: the post-hoc baselines are measured on it')
    p.add_argument('--baseline-out', help='where to write the baseline model folder (needed with --baseline-run)')
    p.add_argument('--dtype', choices=DTYPES, default='float32', help='storage precision (weights rounded first)')
    p.add_argument('--fit-limit', type=int, default=0, help='ID training images for KNN/Mahalanobis/ViM/ReAct (0 = all)')
    p.add_argument('--limit', type=int, default=0, help='at most this many images per test set (0 = all)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repo-id', help='push the folder to this Hugging Face Hub model repo')
    p.add_argument('--token', help='Hub token (default: the logged-in one or HF_TOKEN)')
    p.add_argument('--private', action='store_true')
    args = vars(p.parse_args(argv))
    if not args['protocol']:
        p.error('--protocol is required: release evaluates on a named protocol\'s splits. A run on your own folders '
                '(--data folder): `ssod save RUN/best.pt DIR`, then `ssod calibrate DIR --val-dir ... --ood-dirs ...` '
                'and `ssod eval --model DIR ...`')
    try:
        done = release(**args)
    except (ReleaseError, DataMissing) as e:
        print(f'ssod release: error: {e}', file=sys.stderr)
        raise SystemExit(2)
    shown = ', '.join(f'{k} {done[k]:.6g}' for k in ('spatial_threshold', 'ood_threshold') if done[k] is not None)
    print(f'released {args["run_dir"]} to {done["out"]} ({shown}) in {done["seconds"]:.0f} s'
          + (f'; pushed to {args["repo_id"]}' if args['repo_id'] else ''), file=sys.stderr)
    return done


if __name__ == '__main__':
    main()
