"""``ssod save <checkpoint> <dir>`` and ``ssod push <checkpoint> <repo_id>``: publish a training checkpoint as a
hub-ready folder (:func:`ssod_zoo.save_pretrained`) or a Hub repo (:func:`ssod_zoo.push_to_hub`)."""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..hub import WeightsError, load_checkpoint, push_to_hub, save_pretrained

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ssod save <checkpoint> <dir>`` and ``ssod push <checkpoint> <repo_id>``."""
    parser = argparse.ArgumentParser(prog='ssod', description='Publish SSOD weights from a training checkpoint.')
    sub = parser.add_subparsers(dest='command', required=True)
    save = sub.add_parser('save', help='write a hub-ready folder (config.json, model.safetensors, README.md)')
    save.add_argument('checkpoint', type=Path, help='training checkpoint (ssod_zoo.train/1)')
    save.add_argument('save_dir', type=Path, help='folder to write')
    push = sub.add_parser('push', help='upload that folder to a Hugging Face Hub model repo')
    push.add_argument('checkpoint', type=Path, help='training checkpoint (ssod_zoo.train/1)')
    push.add_argument('repo_id', help='<org>/<name>; created if missing')
    push.add_argument('--revision', help='branch to commit to (default: main)')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--token', help='Hub token (default: the logged-in one or HF_TOKEN)')
    push.add_argument('--commit-message', default='Add SSOD weights (ssod_zoo)')
    for p in (save, push):
        p.add_argument('--ood-threshold', type=float,
                       help="rejection threshold to publish instead of the checkpoint's calibrated one")
        p.add_argument('--no-card', action='store_true', help='do not write README.md')
    args = parser.parse_args(argv)

    try:
        model, ckpt = load_checkpoint(args.checkpoint)
    except (WeightsError, FileNotFoundError) as e:
        parser.exit(2, f'ssod {args.command}: error: {e}\n')
    threshold = args.ood_threshold if args.ood_threshold is not None else ckpt.get('ood_threshold')
    if threshold is None:
        print(f'ssod {args.command}: warning: {args.checkpoint} has no calibrated ood_threshold; the published '
              'model will have none. Pass --ood-threshold, or calibrate with ssod_zoo.hub.calibrate_threshold',
              file=sys.stderr)
    save_kwargs = dict(train_config=ckpt.get('config'), metrics=ckpt.get('metrics'),
                       class_names=ckpt.get('class_names'), ood_threshold=threshold, model_card=not args.no_card)
    if args.command == 'save':
        out = save_pretrained(model, args.save_dir, **save_kwargs)
        print(f'wrote {out} (load it with timm.create_model("local-dir:{out}", pretrained=True))')
    else:
        info = push_to_hub(model, args.repo_id, revision=args.revision, private=args.private, token=args.token,
                           commit_message=args.commit_message, **save_kwargs)
        print(f'pushed {args.repo_id}: {getattr(info, "commit_url", info)} '
              f'(load it with timm.create_model("hf-hub:{args.repo_id}", pretrained=True))')
    return 0


if __name__ == '__main__':
    sys.exit(main())
