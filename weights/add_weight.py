"""Turn a training checkpoint into a published SSOD weight: a hub folder plus an entry in manifest.json.

    python weights/add_weight.py runs/synth/last.pt --tag synth_r160 [--hf-hub-id ORG/REPO]
    python weights/add_weight.py runs/fmnist_ssod/release.pt --tag fmnist --dtype float16   (after ssod release)
    python weights/add_weight.py --recalibrate ssod_resnet18.fmnist -- --protocol fashion-mnist --data-root ROOT

writes ``weights/<arch>.<tag>/`` (config.json, model.safetensors, README.md: what ``ssod save`` writes, i.e.
exactly what gets pushed to the Hub) and records the weight in ``weights/manifest.json`` with its sha256, size,
model arguments, timm pretrained_cfg, training config and measured metrics. From the next import on,
``timm.create_model('<arch>.<tag>', pretrained=True)`` loads it offline, sha256-checked. Weights over 25 MB are
not kept in the repository: publish them with ``ssod push`` and add them with ``--hub-only --hf-hub-id``.

``--recalibrate NAME -- ARGS`` sets a shipped weight's thresholds (and, given OOD validation images, its readout)
again with ``ssod calibrate FOLDER ARGS`` (its folder in place, the weights untouched: their sha256 is checked)
and records them in its manifest entry's ``model_args``.
"""
import argparse
import json
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ssod_zoo import hub
from ssod_zoo._pretrained import _weights_dir

WEIGHTS_DIR = Path(__file__).resolve().parent
TAG_CHARS = set('abcdefghijklmnopqrstuvwxyz0123456789_')


def add_weight(
        checkpoint: Path,
        tag: str,
        *,
        weights_dir: Path = WEIGHTS_DIR,
        hf_hub_id: Optional[str] = None,
        hub_only: bool = False,
        ood_threshold: Optional[float] = None,
        force: bool = False,
        dtype: str = 'float32',
) -> Dict[str, Any]:
    """Write ``weights_dir/<arch>.<tag>/`` and its manifest entry; returns the entry."""
    if not tag or not set(tag) <= TAG_CHARS:
        raise ValueError(f'tag {tag!r}: use lower-case letters, digits and "_" (timm splits names at ".")')
    model, ckpt = hub.load_checkpoint(checkpoint)
    arch = ckpt['architecture']
    name = f'{arch}.{tag}'
    manifest_path = weights_dir / hub.MANIFEST_NAME
    manifest = (json.loads(manifest_path.read_text()) if manifest_path.is_file()
                else {'format': hub.MANIFEST_FORMAT, 'weights': []})
    if manifest.get('format') != hub.MANIFEST_FORMAT:
        raise ValueError(f'{manifest_path} is not a {hub.MANIFEST_FORMAT} manifest')
    previous = next((e for e in manifest['weights'] if e['name'] == name), None)
    if previous is not None and not force:
        raise FileExistsError(f'{name} is already in {manifest_path}; pass --force to replace it')
    hf_hub_id = hf_hub_id or (previous or {}).get('hf_hub_id')  # re-adding keeps where it was published
    if hub_only and not hf_hub_id:
        raise ValueError('--hub-only needs --hf-hub-id: the weight must be loadable from somewhere')

    threshold = ood_threshold if ood_threshold is not None else ckpt.get('ood_threshold')
    folder = weights_dir / name
    with tempfile.TemporaryDirectory() as tmp:
        out = hub.save_pretrained(model, Path(tmp) / name, train_config=ckpt.get('config'),
                                  metrics=ckpt.get('metrics'), class_names=ckpt.get('class_names'),
                                  ood_threshold=threshold)
        if dtype != 'float32':  # lossless only: `ssod release --dtype float16` rounds (and measures) first
            from ssod_zoo.app.release import DTYPES, ReleaseError, store_as
            try:
                store_as(out, DTYPES[dtype])
            except ReleaseError as e:
                raise ValueError(f'{e}: release the run with `ssod release ... --dtype {dtype}` and add its '
                                 'release.pt, so the published numbers are those of the stored tensors') from None
        weights_file = out / hub.WEIGHTS_NAME
        size = weights_file.stat().st_size
        if size > hub.MAX_SHIPPED_BYTES and not hub_only:
            raise ValueError(f'{name}: model.safetensors is {size / 2 ** 20:.1f} MB, over the 25 MB that may live '
                             'in the repository. Publish it (`ssod push CHECKPOINT ORG/REPO`) and add it with '
                             '--hub-only --hf-hub-id ORG/REPO')
        config = json.loads((out / hub.CONFIG_NAME).read_text())
        entry = {
            'name': name,
            'architecture': arch,
            'tag': tag,
            'hf_hub_id': hf_hub_id,
            'file': None if hub_only else f'{name}/{hub.WEIGHTS_NAME}',
            'sha256': hub._sha256(weights_file),
            'size': size,
            'num_classes': config['num_classes'],
            'model_args': config['model_args'],  # with the thresholds and readout, as the registry loads them
            'pretrained_cfg': config['pretrained_cfg'],
            'metrics': ckpt.get('metrics') or {},
            'recipe': {'checkpoint_format': ckpt.get('format'), 'epoch': ckpt.get('epoch'),
                       'config': ckpt.get('config') or {}},
            'added': date.today().isoformat(),
        }
        if not hub_only:
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(out, folder)

    manifest['weights'] = [e for e in manifest['weights'] if e['name'] != name] + [entry]
    _write_manifest(manifest, manifest_path)
    return entry


def _write_manifest(manifest: Dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(manifest, indent=2) + '\n')
    tmp.replace(path)


def recalibrate(name: str, calibrate_args: Sequence[str], *, weights_dir: Path = WEIGHTS_DIR) -> Dict[str, Any]:
    """``ssod calibrate`` on the shipped folder of ``name`` (in place), then its manifest entry updated to the
    thresholds written; the weights file must keep the sha256 the manifest records. Returns the entry."""
    from ssod_zoo.app import calibrate
    manifest_path = weights_dir / hub.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    entry = next((e for e in manifest['weights'] if e['name'] == name), None)
    if entry is None or entry.get('file') is None:
        raise ValueError(f'{name} is not a weight shipped in {weights_dir}: '
                         f'{", ".join(e["name"] for e in manifest["weights"] if e.get("file"))}')
    if '--out' in calibrate_args:
        raise ValueError('--recalibrate updates the shipped folder in place; leave out --out')
    folder = weights_dir / name
    calibrate.main([str(folder), *calibrate_args])
    if hub._sha256(folder / hub.WEIGHTS_NAME) != entry['sha256']:
        raise RuntimeError(f'{folder / hub.WEIGHTS_NAME} no longer matches the manifest; restore it from git')
    entry['model_args'] = json.loads((folder / hub.CONFIG_NAME).read_text())['model_args']
    for key in hub.CALIBRATED:  # entries written before the model arguments were their only record
        entry.pop(key, None)
    # the whole card again, as add_weight wrote it, now with the thresholds and what they were calibrated on
    hub.write_card(folder, train_config=entry['recipe']['config'], metrics=entry['metrics'])
    _write_manifest(manifest, manifest_path)
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['--recalibrate']:
        if len(argv) < 3 or argv[2] != '--':
            raise SystemExit('usage: add_weight.py --recalibrate NAME -- '
                             '(--val-dir DIR | --protocol P [--data-root R])')
        entry = recalibrate(argv[1], argv[3:])
        args = entry['model_args']
        print(f'recalibrated {entry["name"]}: ' + ', '.join(f'{k} = {args.get(k)}' for k in hub.CALIBRATED))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     epilog='python weights/add_weight.py --recalibrate NAME -- ARGS: set a shipped '
                                            "weight's thresholds again (ARGS: ssod calibrate's, e.g. --val-dir DIR)")
    parser.add_argument('checkpoint', type=Path, help='training checkpoint (ssod_zoo.train/1)')
    parser.add_argument('--tag', required=True, help='weight tag: the model loads as <arch>.<tag>')
    parser.add_argument('--hf-hub-id', help='Hub repo the same folder is pushed to (kept from the entry it replaces)')
    parser.add_argument('--hub-only', action='store_true', help='record a Hub-only weight; keep no file here')
    parser.add_argument('--ood-threshold', type=float, help="publish this threshold, not the checkpoint's")
    parser.add_argument('--weights-dir', type=Path, default=WEIGHTS_DIR, help='default: this folder')
    parser.add_argument('--force', action='store_true', help='replace an entry of the same name')
    parser.add_argument('--dtype', choices=('float32', 'float16', 'bfloat16'), default='float32',
                        help='storage precision; the weights must already hold its values (ssod release --dtype)')
    args = parser.parse_args(argv)
    try:
        entry = add_weight(args.checkpoint, args.tag, weights_dir=args.weights_dir, hf_hub_id=args.hf_hub_id,
                           hub_only=args.hub_only, ood_threshold=args.ood_threshold, force=args.force,
                           dtype=args.dtype)
    except (ValueError, FileExistsError, FileNotFoundError, hub.WeightsError) as e:
        parser.exit(2, f'add_weight: error: {e}\n')
    where = 'Hub only' if args.hub_only else f'{args.weights_dir / entry["name"]}'
    # the package reads the manifest it was installed with: a plain `pip install .` copied it into site-packages
    read = _weights_dir()
    stale = read is None or read.resolve() != args.weights_dir.resolve()
    reinstall = (f' after installing this checkout again (`pip install .`: the installed ssod_zoo reads '
                 f'{read / hub.MANIFEST_NAME if read else "no manifest"}), or from an editable install'
                 if stale else '')
    print(f'added {entry["name"]} ({entry["size"]} bytes, sha256 {entry["sha256"][:12]}..., {where})\n'
          f'load it{reinstall}: timm.create_model("{entry["name"]}", pretrained=True)\n'
          f'publish the same folder: ssod push {args.checkpoint} <org>/{entry["name"]}, then re-run with '
          f'--hf-hub-id <org>/{entry["name"]} --force')
    return 0


if __name__ == '__main__':
    sys.exit(main())
