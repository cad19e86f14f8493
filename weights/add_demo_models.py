"""The models ``ssod demo`` evaluates by default: an SSOD model and its cross-entropy twin, as hub-ready folders.

    python weights/add_demo_models.py SSOD_RUN CE_RUN

SSOD_RUN and CE_RUN are training run folders (``last.pt``, optionally ``wall.json``) made with the study's chosen
recipe (``benchmarks/study.py``; ``ssod demo --retrain`` trains the same). Writes ``weights/demo/ssod`` and
``weights/demo/ce`` (config.json, model.safetensors, README.md: what ``ssod save`` writes) and
``weights/demo/recipe.json``: both training configs, the epochs trained, the wall times where recorded, each
file's sha256, and the benchmark generator version the models were trained on.
"""
import argparse
import json
import sys
from pathlib import Path

from ssod_zoo.app.synthetic import GENERATOR_VERSION
from ssod_zoo import hub
from ssod_zoo.hub import load_checkpoint, save_pretrained

DEMO_DIR = Path(__file__).resolve().parent / 'demo'


def add_demo_models(ssod_run: Path, ce_run: Path, out: Path = DEMO_DIR) -> dict:
    recipe = {'generator_version': GENERATOR_VERSION, 'models': {}}
    for name, run in (('ssod', ssod_run), ('ce', ce_run)):
        model, ckpt = load_checkpoint(run / 'last.pt')
        if ckpt['config']['ce_only'] != (name == 'ce'):
            raise SystemExit(f'{run}: expected a{" --ce-only" if name == "ce" else "n SSOD"} run for the {name} model')
        if name == 'ce':
            model.ood_threshold = None  # its OOD head was never trained: no threshold to publish
        folder = save_pretrained(model, out / name, train_config=ckpt['config'], class_names=ckpt['class_names'])
        wall = run / 'wall.json'
        recipe['models'][name] = {
            'epochs': ckpt['epoch'], 'config': ckpt['config'], 'ood_threshold': model.ood_threshold,
            'train_seconds': json.loads(wall.read_text())['train_seconds'] if wall.exists() else None,
            'sha256': hub._sha256(folder / 'model.safetensors')}
    (out / 'recipe.json').write_text(json.dumps(recipe, indent=1) + '\n')
    return recipe


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('ssod_run', type=Path)
    p.add_argument('ce_run', type=Path)
    args = p.parse_args(argv)
    recipe = add_demo_models(args.ssod_run, args.ce_run)
    print(json.dumps({k: {'epochs': v['epochs'], 'sha256': v['sha256']} for k, v in recipe['models'].items()}),
          file=sys.stderr)


if __name__ == '__main__':
    main()
