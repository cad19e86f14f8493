"""``ssod calibrate``: set a model's rejection thresholds on your own in-distribution validation images.

    ssod calibrate MODEL --val-dir DIR [--out FOLDER]
    ssod calibrate MODEL --protocol fashion-mnist --data-root ROOT     # a named protocol's ID validation split

A threshold keeps 95% of the ID images it was calibrated on (the FPR95 operating point); it holds only for that
kind of data and the model's preprocessing. This command calibrates both of the model's thresholds on the images
under ``--val-dir`` (any folder of images, searched recursively; class sub-folders are not needed), or on a named
protocol's ID validation split (``ssod eval --protocol``'s data):

* ``spatial_threshold`` on ``model.spatial_score`` (the mean MaxLogit of the 3 best feature-map positions), the
  default readout when the model has none of its own;
* ``ood_threshold`` on ``ood_factor`` (the paper's Eq. 15), unless the model's OOD head was never trained (a
  cross-entropy twin).

``--ood-dirs`` (optional) also scores OOD validation images, as unlike your classes as what you expect to meet,
prints each rule's FPR95 on them, and records the model's ``readout``, the one ``ssod predict`` then decides with
by default: the spatial rule, unless the factor's average is lower by more than that average's noise on so many
images (one binomial sd, at least 2 points). The readout that works depends on the data (the spatial score wins
on small objects in clutter and fails on object-centric images such as Fashion-MNIST; README, Results), so it is
chosen on images like these, never on your test set. Without OOD images (``--val-dir`` alone) the model keeps the
readout chosen before, or the spatial default.

MODEL is a hub folder (``ssod save``, ``save_pretrained``): its ``config.json`` and model card are updated in place,
the weights are not touched. With ``--out``, or for any other MODEL (a training checkpoint, ``hf-hub:org/repo``,
a registered ``ssod_<arch>.<tag>``), a new hub folder is written there instead. From a saved model (a folder, a
tag, a Hub repo) that folder is a copy, calibrated: the weights file as it was, and the card's results and training
config. A readout kept from an earlier calibration on other ID images says so in the card.

The thresholds hold for the classes the ID images cover: a ``--val-dir`` that seems to leave some out (class
sub-folders without one of the model's classes; in a flat folder, classes no image is predicted as) gets a warning.
"""
import argparse
import shutil
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from .cli import AT_LEAST_0, AT_LEAST_1, bounded, device as device_arg
from .images import class_key, ood_set_names
from .predict import label_names
from .protocols import PROTOCOLS

__all__ = ['main']

FEW = 100  # fewer images than this get a warning: the rates measured on them are too uncertain to rely on


def spread_points(n: int, p: float = 0.5) -> float:
    """One standard deviation, in points, of a rate ``p`` measured on ``n`` images (binomial); 0.5 is the widest."""
    return 100 * (p * (1 - p) / n) ** 0.5


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog='ssod calibrate', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', metavar='MODEL', help='hub folder, training checkpoint, local-dir:, hf-hub:org/repo or '
                                                  'a registered ssod_<arch>.<tag>')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--val-dir', help='in-distribution validation images (searched recursively)')
    source.add_argument('--protocol', choices=PROTOCOLS, help="a named protocol's ID validation split (ssod eval's)")
    p.add_argument('--data-root', default=None, help='where the --protocol data sets are')
    p.add_argument('--download', action='store_true', help='download a missing --protocol data set')
    p.add_argument('--ood-dirs', nargs='+', default=[], metavar='DIR',
                   help="OOD validation images: report each rule's FPR95 on them and choose the model's readout, ssod "
                        "predict's default --rule: the spatial one unless the factor is lower by more than the noise "
                        "(with --protocol, its OOD validation sets are scored too)")
    p.add_argument('--data-name', default=None,
                   help="what the model card calls the calibration images (default: the --val-dir folder's name, "
                        "with its parent's when it is a split such as val, e.g. pets/val; or the protocol's split)")
    p.add_argument('--out', default=None, help='write a new hub folder here (default: update MODEL, a hub folder, '
                                               'in place)')
    p.add_argument('--overwrite', action='store_true', help='let --out replace a hub folder already there')
    p.add_argument('--batch-size', type=bounded(int, *AT_LEAST_1), default=64, help='(default: %(default)s)')
    p.add_argument('--workers', type=bounded(int, *AT_LEAST_0), default=0, help='(default: %(default)s)')
    p.add_argument('--device', type=device_arg, default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='(default: %(default)s)')
    p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                   help='progress bar on stderr (default: only on a terminal)')
    args = p.parse_args(argv)
    folder = Path(args.model.removeprefix('local-dir:'))
    in_place = args.out is None
    if args.val_dir and (args.data_root or args.download):
        p.error('--data-root and --download go with --protocol; --val-dir names the images itself')
    from ..hub import registered
    if in_place and not (folder / 'config.json').is_file() and not folder.exists() and not (
            args.model.startswith('hf-hub:') or registered(args.model)):
        p.error(f'{args.model}: no such file or folder (nor an hf-hub:org/repo or a registered ssod_<arch>.<tag>)')
    if in_place and not (folder / 'config.json').is_file():
        p.error(f'{args.model} is not a hub folder to update in place: give --out FOLDER for the new hub folder')
    if args.out and (Path(args.out) / 'model.safetensors').exists() and not args.overwrite:
        p.error(f'--out {args.out} already holds a model; pass --overwrite to replace it, or give a new folder')
    for flag, d in [('--val-dir', args.val_dir)] + [('--ood-dirs', d) for d in args.ood_dirs]:
        if d and not Path(d).is_dir():
            p.error(f'{flag} {d} is not a directory')
    ood_names = ood_set_names(args.ood_dirs)
    if len(set(ood_names)) < len(ood_names):
        p.error(f'--ood-dirs: {", ".join(args.ood_dirs)} name the same folder twice')

    import timm
    from .._card import id_dataset_name
    from ..hub import (WeightsError, fewest_to_resolve, load_checkpoint, load_model, save_pretrained, saved_folder,
                       set_thresholds)
    from ..metrics import fpr_at_tpr
    from .evaluate import COLLECTED, collect, thresholds_of
    from .images import ImageError, ImageFiles, one_line
    from .protocols import DataMissing, Transformed, load_protocol

    def fail(e: BaseException):
        print(f'ssod calibrate: error: {one_line(e)}', file=sys.stderr)
        raise SystemExit(2)

    device = torch.device(args.device)
    ckpt, ood_sets = {}, {}
    try:
        if Path(args.model).is_file():
            model, ckpt = load_checkpoint(args.model)
        else:
            model = load_model(args.model)
        source = None if in_place else saved_folder(args.model)
        model = model.to(device).eval()
        transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
        if args.protocol:
            data = load_protocol(args.protocol, args.data_root, args.download, split='train')
            if data.val is None:
                raise DataMissing(f'the {args.protocol} protocol has no ID validation split')
            images, name = Transformed(data.val, transform), f"the {args.protocol} protocol's ID validation split"
            ood_sets = {k: Transformed(v, transform) for k, v in data.ood_val.items()}
        else:
            images = ImageFiles(args.val_dir, transform)
            name = id_dataset_name({}, {'val_dir': args.val_dir})
    except (WeightsError, FileNotFoundError, RuntimeError, ValueError, ImageError, DataMissing) as e:
        fail(e)
    # a cross-entropy twin's OOD head was never trained (the loaders read it off its folder or checkpoint), and it
    # gets no ood_threshold
    trained = getattr(model, 'ood_head_trained', True)

    def loader(ds):
        return DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)

    bar = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        id_out = collect(model, loader(images), device, spatial=True, progress='calibrate' if bar else None)
        with warnings.catch_warnings():  # too few images: said below, with the spread, in ssod calibrate's words
            warnings.filterwarnings('ignore', message='calibrate_threshold: ')
            thresholds = thresholds_of(id_out, trained)
        ood_sets.update({n: ImageFiles(d, transform) for n, d in zip(ood_names, args.ood_dirs)})
        oods = {k: collect(model, loader(v), device, spatial=True, progress=f'OOD {k}' if bar else None)
                for k, v in ood_sets.items()}
    except ImageError as e:
        fail(e)
    rules = [r for r in COLLECTED if trained or r != 'factor']  # a twin's untrained OOD head: no factor rule
    fpr95 = {name: {rule: 100 * fpr_at_tpr(id_out[COLLECTED[rule]], o[COLLECTED[rule]]) for rule in rules}
             for name, o in oods.items()}
    chosen = _choose(fpr95, {name: len(o['ood_factor']) for name, o in oods.items()})
    if chosen:  # the FPR95 were read at the thresholds these ID images give
        chosen['id_data'] = args.data_name or name
    readout = chosen['readout'] if chosen else getattr(model, 'readout', None)  # else the weights' earlier choice
    if in_place:
        set_thresholds(folder, thresholds, id_dataset=args.data_name or name, images=len(images), readout=chosen)
        where = folder
    elif source is not None:  # a saved model: the copy keeps its weights file, metrics, training config and card
        where = Path(args.out)
        _copy_saved(source, where)
        set_thresholds(where, thresholds, id_dataset=args.data_name or name, images=len(images), readout=chosen)
    else:  # a training checkpoint
        for k, v in thresholds.items():
            setattr(model, k, v)
        model.readout = readout
        where = save_pretrained(model, args.out, train_config=ckpt.get('config'), metrics=ckpt.get('metrics'),
                                class_names=ckpt.get('class_names') or model.pretrained_cfg.get('label_names'),
                                ood_head_trained=trained,
                                calibration={'data': args.data_name or name, 'images': len(images), 'keep': 0.95,
                                             **({'readout': chosen} if chosen else {})})
    if len(images) < FEW:
        print(f'ssod calibrate: warning: only {len(images)} ID images: the share of new ID images the thresholds '
              f'keep may differ from 95% by about {spread_points(len(images), 0.95):.0f} points (one sd); '
              'use a few hundred', file=sys.stderr)
    if args.val_dir:
        partial = _missing_classes(Path(args.val_dir), label_names(model), id_out['logits'])
        if partial:
            print(f'ssod calibrate: warning: {partial}', file=sys.stderr)
    for k, o in oods.items():
        if len(o['ood_factor']) < FEW:
            print(f'ssod calibrate: warning: only {len(o["ood_factor"])} images in OOD set {k}: an FPR95 measured '
                  f'on them is uncertain by up to {spread_points(len(o["ood_factor"])):.0f} points (one sd); '
                  'use a few hundred', file=sys.stderr)
    shown = ', '.join(f'{k} = {v:.6g}' for k, v in thresholds.items() if v is not None)
    skipped = '' if trained else '; no ood_threshold: this model\'s OOD head was never trained'
    keeps = '95% of them' if len(images) >= fewest_to_resolve() else f'all {len(images)}: too few to resolve 95%'
    print(f'{len(images)} ID images: {shown} (each keeps {keeps}){skipped}; wrote {where}', file=sys.stderr)
    if fpr95:
        print(_fpr95_table(fpr95, {n: len(o['ood_factor']) for n, o in oods.items()}), file=sys.stderr)
    print(f'ssod predict decides with --rule {readout or "spatial"} ({_why(chosen, readout, trained)})',
          file=sys.stderr)
    return {**thresholds, 'images': len(images), 'out': str(where), 'fpr95': fpr95, 'readout': readout}


def _why(chosen: Optional[dict], readout: Optional[str], trained: bool) -> str:
    """Where the rule ``ssod predict`` will decide with came from, for the last line."""
    if chosen and len(set(chosen['fpr95'].values())) == 1:
        return 'a tie on these OOD images, so the spatial default'
    gap = chosen['fpr95'].get(readout, 0) - min(chosen['fpr95'].values()) if chosen else 0
    if gap > 0:
        return (f'the other rule is lower on these OOD images by {gap:.1f} points, within the {chosen["margin"]:.1f} '
                'it must beat on this many images, so the spatial default')
    if chosen:
        return 'chosen on these OOD images'
    if readout:
        return 'kept from before'
    if not trained:
        return "its only rule: this model's OOD head was never trained"
    return 'none chosen, so the spatial default; give --ood-dirs to choose one'


def _missing_classes(folder: Path, names: List[str], logits: torch.Tensor) -> Optional[str]:
    """What to say when the ID images seem to leave out some of the model's classes, else None: a class's images can
    score lower than the rest, and thresholds set without them keep fewer than 95% of the ID images met later.

    A folder with a sub-folder named after one of the classes (up to case and punctuation: ``class_key``) is read
    as class sub-folders, and the missing ones are named; in any other folder, with at least 10 images per class,
    the classes that no image is predicted as."""
    some = (lambda n: n if len(n) <= 5 else n[:5] + [f'{len(n) - 5} more'])
    folders = {class_key(p.name) for p in folder.iterdir() if p.is_dir()}
    if folders & {class_key(n) for n in names}:
        missing = [n for n in names if class_key(n) not in folders]
        if missing:
            return (f'{folder} has no sub-folder for {len(missing)} of the model\'s {len(names)} classes '
                    f'({", ".join(some(missing))}): the thresholds keep 95% of the classes it has, and images of the '
                    'others may score lower; calibrate on images of every class')
        return None
    if len(logits) < 10 * len(names):  # too few to expect every class among the predictions
        return None
    predicted = set(logits.argmax(1).tolist())
    missing = [n for i, n in enumerate(names) if i not in predicted]
    if missing:
        return (f'none of the {len(logits)} ID images is predicted as {len(missing)} of the model\'s {len(names)} '
                f'classes ({", ".join(some(missing))}): if the folder lacks them, the thresholds may keep fewer than '
                '95% of the images of those classes; calibrate on images of every class')
    return None


def _copy_saved(source: Path, out: Path) -> None:
    """The saved model's files, as they are, into ``out``: its ``config.json`` and weights, and its card, or a card
    written from the config when it has none."""
    from ..hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, write_card
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == source.resolve():
        return
    for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if not (source / CARD_NAME).is_file():
        write_card(out)


def _choose(fpr95: dict, sizes: Dict[str, int]) -> Optional[dict]:
    """The readout for the OOD validation sets, with what it was chosen on; None without OOD sets or with one rule
    only (a twin's). The spatial one, the study's default, unless another rule's average FPR95 is lower by more than
    ``margin``: the noise of that average on sets of ``sizes`` images (one binomial sd at 50%), and at least the 2
    points the study asked of any change. A gap within the noise of a few dozen OOD images decides nothing."""
    rules = list(next(iter(fpr95.values()))) if fpr95 else []
    if len(rules) < 2:
        return None
    average = {r: round(v, 4) for r, v in _averages(fpr95).items()}
    noise = sum(spread_points(max(sizes[name], 1)) ** 2 for name in fpr95) ** 0.5 / len(fpr95)
    margin = round(max(2.0, noise), 1)
    best = min(rules, key=lambda r: (average[r], r != 'spatial'))
    # compared at the 0.1 point both are shown at: "lower by 4.8, within the 4.8" would read as a contradiction
    readout = best if 'spatial' not in average or round(average['spatial'] - average[best], 1) > margin else 'spatial'
    return {'readout': readout, 'ood_data': list(fpr95), 'fpr95': average, 'margin': margin}


def _averages(fpr95: dict) -> dict:
    """Each rule's FPR95 averaged over the OOD sets."""
    rules = list(next(iter(fpr95.values())))
    return {r: sum(v[r] for v in fpr95.values()) / len(fpr95) for r in rules}


def _fpr95_table(fpr95: dict, counts: dict) -> str:
    """Each rule's FPR95 per OOD set and on average."""
    average = _averages(fpr95)
    rules = list(average)
    width = max(9, *map(len, fpr95))
    lines = ['FPR95 (%) on the OOD validation images, at the point that keeps 95% of the ID images (lower is better):',
             f'  {"set":<{width}} {"images":>7}' + ''.join(f' {"--rule " + r:>15}' for r in rules)]
    lines += [f'  {name:<{width}} {counts[name]:>7}' + ''.join(f' {v[r]:>15.1f}' for r in rules)
              for name, v in fpr95.items()]
    if len(fpr95) > 1:
        lines.append(f'  {"average":<{width}} {"":>7}' + ''.join(f' {average[r]:>15.1f}' for r in rules))
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
