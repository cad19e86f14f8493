"""``ssod save <checkpoint> <dir>`` and ``ssod push <checkpoint> <repo_id>``: publish a training checkpoint as a
hub-ready folder (:func:`ssod_zoo.save_pretrained`) or a Hub repo (:func:`ssod_zoo.push_to_hub`)."""
import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..hub import (WeightsError, is_network_error, load_checkpoint, offline_hint, push_to_hub, save_pretrained,
                   training_run)
from .cli import bounded

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ssod save <checkpoint> <dir>`` and ``ssod push <checkpoint> <repo_id>``."""
    parser = argparse.ArgumentParser(prog='ssod', description='Publish SSOD weights from a training checkpoint.')
    sub = parser.add_subparsers(dest='command', required=True)
    about = {'save': 'write a hub-ready folder (config.json, model.safetensors, README.md) from a training checkpoint',
             'push': 'upload a training checkpoint, as that folder, to a Hugging Face Hub model repo'}
    save = sub.add_parser('save', help=about['save'], description=about['save'])
    save.add_argument('checkpoint', type=Path, help='training checkpoint (ssod_zoo.train/1)')
    save.add_argument('save_dir', type=Path, help='folder to write')
    save.add_argument('--overwrite', action='store_true', help='replace the weights of a hub folder already there')
    push = sub.add_parser('push', help=about['push'], description=about['push'])
    push.add_argument('checkpoint', type=Path, help='training checkpoint (ssod_zoo.train/1)')
    push.add_argument('repo_id', help='<org>/<name>; created if missing')
    push.add_argument('--revision', help='branch to commit to (default: main)')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--token', help='Hub token (default: the logged-in one or HF_TOKEN)')
    push.add_argument('--commit-message', default='Add SSOD weights (ssod_zoo)')
    for p in (save, push):
        p.add_argument('--ood-threshold', type=bounded(float, lambda v: 0 <= v <= 1, 'in [0, 1], as ood_factor is'),
                       help="threshold on ood_factor to publish instead of the checkpoint's calibrated one")
        p.add_argument('--spatial-threshold', type=bounded(float, math.isfinite, 'a finite number'),
                       help="threshold on spatial_score to publish instead of the checkpoint's calibrated one")
        p.add_argument('--no-card', action='store_true', help='do not write README.md')
    args = parser.parse_args(argv)
    run = training_run(args.checkpoint)
    if run:
        parser.exit(2, f'ssod {args.command}: error: {run}\n')
    if (args.checkpoint / 'config.json').is_file():
        parser.exit(2, f'ssod {args.command}: error: {args.checkpoint} is already a hub-ready folder; load it with '
                       f'timm.create_model("local-dir:{args.checkpoint}", pretrained=True), or upload it as it is '
                       f'(`hf upload REPO_ID {args.checkpoint}`). ssod {args.command} takes a training checkpoint '
                       '(runs/NAME/last.pt or best.pt)\n')
    written = [f for f in ('config.json', 'model.safetensors') if args.command == 'save' and
               (args.save_dir / f).exists()]
    if written and not args.overwrite:
        parser.exit(2, f'ssod save: error: {args.save_dir} already holds {" and ".join(written)}; pass --overwrite to '
                       'replace them, or give a new folder\n')

    try:
        model, ckpt = load_checkpoint(args.checkpoint)
    except (WeightsError, FileNotFoundError) as e:
        parser.exit(2, f'ssod {args.command}: error: {e}\n')
    threshold = args.ood_threshold if args.ood_threshold is not None else ckpt.get('ood_threshold')
    spatial = args.spatial_threshold if args.spatial_threshold is not None else ckpt.get('spatial_threshold')
    expected = {'spatial_threshold': spatial}
    if not (ckpt.get('config') or {}).get('ce_only'):  # a twin's untrained OOD head gets no ood_threshold
        expected['ood_threshold'] = threshold
    missing = [name for name, value in expected.items() if value is None]
    if missing:
        remedy = ('calibrate the written folder on ID validation images with `ssod calibrate '
                  f'{args.save_dir} --val-dir DIR`' if args.command == 'save' else
                  f'to publish them, calibrate first: `ssod calibrate {args.checkpoint} --val-dir DIR --out FOLDER`, '
                  f'then `hf upload {args.repo_id} FOLDER`')
        print(f'ssod {args.command}: warning: {args.checkpoint} has no calibrated {" or ".join(missing)}; the '
              f'published model will have none; {remedy}', file=sys.stderr)
    save_kwargs = dict(train_config=ckpt.get('config'), metrics=ckpt.get('metrics'),
                       class_names=ckpt.get('class_names'), ood_threshold=threshold,
                       spatial_threshold=spatial, model_card=not args.no_card)
    if args.command == 'save':
        out = save_pretrained(model, args.save_dir, **save_kwargs)
        if written and args.no_card and (out / 'README.md').exists():
            print(f'ssod save: warning: {out / "README.md"} is left as it was and may describe the weights it '
                  'replaced (--no-card)', file=sys.stderr)
        print(f'wrote {out} (load it with timm.create_model("local-dir:{out}", pretrained=True))')
    else:
        try:
            info = push_to_hub(model, args.repo_id, revision=args.revision, private=args.private, token=args.token,
                               commit_message=args.commit_message, **save_kwargs)
        except Exception as e:  # offline, DNS, proxy, HF_HUB_OFFLINE, auth: one line, not httpx's 70-line trace
            if not is_network_error(e):
                raise
            first = (str(e).strip().splitlines() or [''])[0][:200]
            parser.exit(2, f'ssod push: error: uploading to the Hugging Face Hub failed ({type(e).__name__}: {first}). '
                           f'Write the folder now with `ssod save {args.checkpoint} DIR` and upload it later '
                           f'(`hf upload {args.repo_id} DIR`) when the network is back'
                           f'{offline_hint()}\n')
        print(f'pushed {args.repo_id}: {getattr(info, "commit_url", info)} '
              f'(load it with timm.create_model("hf-hub:{args.repo_id}", pretrained=True))')
    return 0


if __name__ == '__main__':
    sys.exit(main())
