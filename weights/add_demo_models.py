"""The models ``ssod demo`` evaluates by default: an SSOD model and its cross-entropy twin, as hub-ready folders.

    python weights/add_demo_models.py SSOD_RUN CE_RUN [--val-dir ID_VAL_DIR]
    python weights/add_demo_models.py --val-dir ID_VAL_DIR [--ood-dirs DIR ...]   # recalibrate the folders only

SSOD_RUN and CE_RUN are training run folders (``last.pt``, optionally ``wall.json``) made with the study's chosen
recipe (``benchmarks/study.py``; ``ssod demo --retrain`` trains the same). Writes ``weights/demo/ssod`` and
``weights/demo/ce`` (config.json, model.safetensors, README.md: what ``ssod save`` writes) and
``weights/demo/recipe.json``: both training configs, the epochs trained, the wall times where recorded, each
file's sha256, and the benchmark generator version the models were trained on.

``--val-dir`` calibrates both models' thresholds (``ssod calibrate``) on in-distribution validation images: the
study's validation draw, ``~/.cache/ssod_zoo/study/bench_seed1/id/val`` (generator seed 1, which
``python benchmarks/study.py`` generates), never the embedded benchmark the demo scores. Given alone, it
recalibrates the folders already here, whose weights it checks against recipe.json and leaves as they are.
``--ood-dirs`` (the same draw's OOD sets) also chooses each model's readout, the rule ``ssod predict`` decides with
by default (``ssod calibrate --ood-dirs``).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ssod_zoo.app.synthetic import GENERATOR_VERSION
from ssod_zoo import hub
from ssod_zoo.app import calibrate
from ssod_zoo.hub import load_checkpoint, load_model, save_pretrained

DEMO_DIR = Path(__file__).resolve().parent / 'demo'


def add_demo_models(ssod_run: Path, ce_run: Path, out: Path = DEMO_DIR) -> dict:
    recipe = {'generator_version': GENERATOR_VERSION, 'models': {}}
    for name, run in (('ssod', ssod_run), ('ce', ce_run)):
        model, ckpt = load_checkpoint(run / 'last.pt')
        if ckpt['config']['ce_only'] != (name == 'ce'):
            raise SystemExit(f'{run}: expected a{" --ce-only" if name == "ce" else "n SSOD"} run for the {name} model')
        folder = save_pretrained(model, out / name, train_config=ckpt['config'], class_names=ckpt['class_names'])
        wall = run / 'wall.json'
        recipe['models'][name] = {
            'epochs': ckpt['epoch'], 'config': ckpt['config'],
            'thresholds': {k: getattr(model, k) for k in hub.THRESHOLDS},
            'train_seconds': json.loads(wall.read_text())['train_seconds'] if wall.exists() else None,
            'sha256': hub._sha256(folder / 'model.safetensors')}
    (out / 'recipe.json').write_text(json.dumps(recipe, indent=1) + '\n')
    return recipe


VAL_NAME = "the ID images of the study's validation draw of the embedded benchmark, generator seed 1"


def calibrate_demo_models(val_dir: Path, out: Path = DEMO_DIR, ood_dirs: Sequence[Path] = ()) -> dict:
    """Both folders re-saved from their own weights with their training config (so ``config.json`` records whether
    the OOD head was trained), then both thresholds calibrated on ``val_dir``; the weights must stay byte for byte
    the ones recipe.json names."""
    recipe = json.loads((out / 'recipe.json').read_text())
    for name, entry in recipe['models'].items():
        folder = out / name
        model = load_model(folder)
        save_pretrained(model, folder, train_config=entry['config'], class_names=model.pretrained_cfg['label_names'])
        if hub._sha256(folder / 'model.safetensors') != entry['sha256']:
            raise SystemExit(f'{folder}: the weights changed on re-saving; restore them from git')
        ood = ['--ood-dirs', *map(str, ood_dirs)] if ood_dirs else []
        thresholds = calibrate.main([str(folder), '--val-dir', str(val_dir), '--data-name', VAL_NAME, *ood])
        entry.pop('ood_threshold', None)
        entry['thresholds'] = {k: thresholds[k] for k in hub.THRESHOLDS}
        entry['readout'] = thresholds['readout']
    recipe['calibrated_on'] = {'images': thresholds['images'], 'what': VAL_NAME}
    (out / 'recipe.json').write_text(json.dumps(recipe, indent=1) + '\n')
    return recipe


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('ssod_run', type=Path, nargs='?')
    p.add_argument('ce_run', type=Path, nargs='?')
    p.add_argument('--val-dir', type=Path, help='ID validation images to calibrate both thresholds on')
    p.add_argument('--ood-dirs', type=Path, nargs='+', default=[],
                   help="OOD validation images to choose each model's readout on (with --val-dir)")
    args = p.parse_args(argv)
    if (args.ssod_run is None) != (args.ce_run is None) or (args.ssod_run is None and args.val_dir is None):
        p.error('give SSOD_RUN and CE_RUN, --val-dir, or both')
    recipe = add_demo_models(args.ssod_run, args.ce_run) if args.ssod_run else None
    if args.val_dir:
        recipe = calibrate_demo_models(args.val_dir, ood_dirs=args.ood_dirs)
    print(json.dumps({k: {'epochs': v['epochs'], 'sha256': v['sha256']} for k, v in recipe['models'].items()}),
          file=sys.stderr)


if __name__ == '__main__':
    main()
