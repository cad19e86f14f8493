"""``ssod predict``: for each image, one of the model's classes or ``unknown``.

    ssod predict MODEL INPUTS... [--rule spatial|factor|posterior] [--threshold T] [--out predictions.csv|.jsonl]

MODEL is any spec :func:`ssod_zoo.load_model` takes: a training checkpoint, a hub folder or ``local-dir:``,
``hf-hub:org/repo``, or a registered ``ssod_<arch>.<tag>``. INPUTS are image files, folders (searched
recursively) and glob patterns. Images are preprocessed as the model was trained
(``timm.data.resolve_data_config(model=model)``: its input size, crop, mean and std; never a default size).

One row per image: ``path``, ``label`` (the class name, or ``unknown``), ``class`` (the most probable class,
whatever the decision), ``class_prob`` (its softmax probability, the ID factor of Eq. 7), ``spatial_score``
(``model.spatial_score``: the mean MaxLogit of the 3 best feature-map positions), ``ood_factor``
(P(in-distribution | x), Eq. 15) and ``p_unknown`` (the last column of the robust posterior of Eq. 7,
``ssod_zoo.robust_posterior``; it equals ``1 - ood_factor``), then the decision's ``rule`` and its ``threshold``
(empty for the posterior rule), so that a saved file says how its labels were decided.

Which rule says "unknown":

* ``--rule spatial``: ``spatial_score < threshold``, with the model's calibrated ``model.spatial_threshold`` (it
  keeps 95% of the in-distribution validation images) or ``--threshold``. This is the readout that detected OOD
  images best in this project's study (README, Results), on the SSOD model and on a plain cross-entropy classifier
  alike.
* ``--rule factor``: ``ood_factor < threshold``, with ``model.ood_threshold`` (calibrated the same way) or
  ``--threshold``: the paper's readout (Eq. 15). Both threshold rules work at the operating point that FPR95 and
  ``ssod eval``'s accept rates describe; use one when you want a known fraction of your own classes kept.
* ``--rule posterior``: ``unknown`` when it is the argmax of Eq. 7's posterior over the M classes plus
  unknown, i.e. ``1 - ood_factor > ood_factor * max softmax``. It needs no calibration, but it is another
  operating point: it calls an image unknown whenever ``ood_factor < 1 / (1 + class_prob)`` (between 0.5 and
  1/(1 + 1/M)), which is usually far above a calibrated threshold, so it rejects more ID images.

Without ``--rule``, the model's own ``model.readout`` decides: the rule ``ssod calibrate --ood-dirs`` chose for
the weights on OOD validation images (``spatial`` for both shipped weights, ``ssod_resnet18.fmnist`` by a
narrow margin: see its card), or ``spatial`` when none was chosen.

A cross-entropy model (``model.ood_head_trained`` False, as the demo's CE twin) has an OOD head that was never
trained: only the spatial rule runs, and its ``ood_factor`` and ``p_unknown`` cells are left empty.

A model without the threshold its rule needs is refused with what to do: ``ssod calibrate MODEL --val-dir DIR``
sets both on your own ID images. The summary line counts the images each rule that can run calls unknown.
"""
import argparse
import csv
import glob
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..adapter import READOUTS
from ..output import robust_posterior
from .cli import AT_LEAST_0, AT_LEAST_1, bounded, device as device_arg
from .images import IMAGE_EXTENSIONS, list_images, to_rgb

__all__ = ['find_images', 'predict', 'default_rule', 'rule_thresholds', 'label_names', 'main', 'IMAGE_EXTENSIONS',
           'COLUMNS', 'RULES']

COLUMNS = ('path', 'label', 'class', 'class_prob', 'spatial_score', 'ood_factor', 'p_unknown', 'rule', 'threshold')
UNKNOWN = 'unknown'
# the rules, in the order the summary line gives them; a threshold rule's threshold is the model attribute
# READOUTS names (ssod_zoo.adapter), the posterior rule needs none
RULES = ('spatial', 'factor', 'posterior')


class PredictError(Exception):
    """A problem with the user's input: one line at the command line."""


def find_images(inputs: Sequence[str]) -> List[Path]:
    """Image files named by ``inputs``: files as given, folders searched recursively, glob patterns expanded.

    Returns:
        The files in input order (each folder's and pattern's files sorted), without duplicates.
    """
    found: Dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = list_images(path, warn_skipped=True)
        else:
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True))
            # a pattern's folders are searched as a folder given by name is ('photos/*' names sub-folders too)
            matches = [f for p in matched for f in ([p] if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                                                    else list_images(p, warn_skipped=True) if p.is_dir() else [])]
            if not matches and not glob.has_magic(item):
                raise PredictError(f'{item}: no such file or folder')
            if not matches:
                warnings.warn(f'{item!r} matches no image files ({", ".join(IMAGE_EXTENSIONS)})', stacklevel=2)
        found.update(dict.fromkeys(matches))
    if not found:
        raise PredictError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) found in {" ".join(inputs)}')
    return list(found)


class _Images(Dataset):
    """Image files with a transform; an unreadable file gives None (reported and skipped, not a traceback)."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image
        try:
            with open(self.paths[i], 'rb') as f:
                image = to_rgb(Image.open(f))
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            return i, None, f'{type(e).__name__}: {e}'
        return i, self.transform(image), None


def _collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None]
    index = torch.tensor([i for i, _ in ok], dtype=torch.long)
    images = torch.stack([x for _, x in ok]) if ok else None
    return index, images, bad


def predict(
        model: torch.nn.Module,
        paths: Sequence[Path],
        threshold: Optional[float] = None,
        rule: Optional[str] = None,
        batch_size: int = 32,
        device: torch.device = torch.device('cpu'),
        workers: int = 0,
        progress: Optional[bool] = None,
        on_error=None,
) -> Iterator[dict]:
    """One row per readable image (see :data:`COLUMNS`), in the order of ``paths``, as an iterator; a bad ``rule``
    or a missing threshold raises at the call, before any image is read.

    Args:
        model: an SSOD model in eval mode; its ``pretrained_cfg`` gives the preprocessing.
        paths: image files.
        threshold: the rule's score below this is unknown; default the model's calibrated threshold for it
            (``spatial_threshold`` for ``'spatial'``, ``ood_threshold`` for ``'factor'``).
        rule: one of :data:`RULES` (see the module docstring); default :func:`default_rule`.
        progress: tqdm bar on stderr; None = only when stderr is a terminal.
        on_error: called with ``(path, message)`` for an unreadable image; default: raise :class:`PredictError`.

    Each row also carries ``_unknown``: ``{rule: bool}`` for every rule that can run (a threshold rule needs a
    threshold), so a caller can count what the other rules would have decided.
    """
    import timm

    rule = rule or default_rule(model)
    thresholds = rule_thresholds(model, rule, threshold)
    trained = getattr(model, 'ood_head_trained', True)
    if rule != 'spatial' and not trained:
        raise PredictError(f'the {rule} rule reads ood_factor, and this model\'s OOD head was never trained (a '
                           'cross-entropy model): use --rule spatial')
    if thresholds[rule] is None and rule != 'posterior':
        attribute = READOUTS[rule].attribute
        others = [r for r in RULES if r != rule and (r == 'posterior' or thresholds[r] is not None) and trained]
        raise PredictError(f'the model has no calibrated {attribute}: set it on your ID validation images with '
                           '`ssod calibrate MODEL --val-dir DIR` (a hub folder, in place; any other MODEL with '
                           '--out FOLDER, then predict with FOLDER), or pass --threshold T'
                           f'{", or use --rule " + " or --rule ".join(others) if others else ""}')
    names = label_names(model)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    loader = DataLoader(_Images(paths, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == 'cuda')
    # the checks above run at the call, before anything is written; the rows come as they are scored
    return _rows(model, paths, loader, names, thresholds, rule, trained, device, progress, on_error)


def default_rule(model: torch.nn.Module) -> str:
    """The rule the model's weights were calibrated to decide with, ``model.readout``; ``'spatial'`` when none was
    chosen."""
    return getattr(model, 'readout', None) or 'spatial'


def rule_thresholds(model: torch.nn.Module, rule: str, threshold: Optional[float] = None) -> Dict[str, Optional[float]]:
    """``{rule: threshold}`` for the threshold rules: the model's calibrated ones, ``threshold`` for ``rule``;
    ``posterior`` maps to None (it needs none)."""
    if rule not in RULES:
        raise ValueError(f"rule is one of {', '.join(map(repr, RULES))}, got {rule!r}")
    found = {r: getattr(model, READOUTS[r].attribute, None) for r in RULES if r in READOUTS}
    if threshold is not None:
        if rule == 'posterior':
            raise PredictError('--threshold sets a threshold rule\'s cut; the posterior rule takes none')
        found[rule] = READOUTS[rule].check(threshold)
    return {**found, 'posterior': None}


@torch.no_grad()
def _rows(model, paths, loader, names, thresholds, rule, trained, device, progress, on_error) -> Iterator[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(paths), unit='img', desc='predict', mininterval=1.0,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    model.eval()
    try:
        for index, images, bad in loader:
            for i, err in bad:
                if on_error is None:
                    raise PredictError(f'cannot read image {paths[i]}: {err}')
                on_error(paths[i], err)
            if images is not None:
                logits, ood_factor, spatial = (t.float().cpu() for t in
                                               model.forward_scores(images.to(device, non_blocking=True)))
                posterior = robust_posterior(logits, ood_factor)
                prob, cls = logits.softmax(dim=1).max(dim=1)
                unknown = {'spatial': None if thresholds['spatial'] is None else spatial < thresholds['spatial'],
                           'factor': None if thresholds['factor'] is None else ood_factor < thresholds['factor'],
                           'posterior': posterior.argmax(dim=1) == posterior.shape[1] - 1}
                if not trained:  # a cross-entropy model's ood_factor means nothing: no rule and no column on it
                    unknown.update(factor=None, posterior=None)
                for j, i in enumerate(index.tolist()):
                    c = int(cls[j])
                    yield {'path': str(paths[i]), 'label': UNKNOWN if unknown[rule][j] else names[c],
                           'class': names[c], 'class_prob': float(prob[j]), 'spatial_score': float(spatial[j]),
                           'ood_factor': float(ood_factor[j]) if trained else None,
                           'p_unknown': float(posterior[j, -1]) if trained else None,
                           'rule': rule, 'threshold': thresholds[rule],
                           '_unknown': {r: bool(u[j]) for r, u in unknown.items() if u is not None}}
            bar.update(len(index) + len(bad))
    finally:
        bar.close()


def label_names(model: torch.nn.Module) -> List[str]:
    """The model's class names (its ``pretrained_cfg['label_names']``), or ``'0'``, ``'1'``, ... without them."""
    names = list((getattr(model, 'pretrained_cfg', None) or {}).get('label_names') or ())
    if len(names) != model.num_classes:
        names = [str(i) for i in range(model.num_classes)]
    return names


class _Writer:
    """CSV (default, also to stdout) or JSON lines, chosen by the file's suffix."""

    JSONL = ('.jsonl', '.json', '.ndjson')
    SUFFIXES = ('.csv', *JSONL)

    def __init__(self, out: Optional[str]):
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(out, 'w', newline='') if out else sys.stdout
        self.jsonl = bool(out) and Path(out).suffix.lower() in self.JSONL
        if not self.jsonl:
            self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction='ignore', lineterminator='\n')
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items() if k in COLUMNS}
        if self.jsonl:
            self.file.write(json.dumps(row) + '\n')
        else:
            self.csv.writerow(row)

    def close(self) -> None:
        if self.file is not sys.stdout:
            self.file.close()


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog='ssod predict', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', metavar='MODEL', help='checkpoint, hub folder, local-dir:, hf-hub:org/repo or a '
                                                  'registered ssod_<arch>.<tag>')
    p.add_argument('inputs', nargs='+', metavar='INPUTS', help='image files, folders (recursive) or glob patterns')
    p.add_argument('--rule', choices=RULES, default=None,
                   help='spatial: spatial_score < threshold; factor: ood_factor < threshold; posterior: argmax of '
                        "the Eq. 7 posterior is unknown (default: the model's readout, chosen for its weights by ssod "
                        'calibrate --ood-dirs, else spatial)')
    p.add_argument('--threshold', type=bounded(float, math.isfinite, 'a finite number'), default=None,
                   help="the rule's score below this is unknown (default: the model's calibrated threshold for the "
                        "rule: spatial_threshold or ood_threshold); in [0, 1] for --rule factor")
    p.add_argument('--out', default=None, help='FILE.csv or FILE.jsonl (default: CSV to stdout)')
    p.add_argument('--batch-size', type=bounded(int, *AT_LEAST_1), default=32,
                   help='images per forward pass (default: %(default)s)')
    p.add_argument('--workers', type=bounded(int, *AT_LEAST_0), default=0,
                   help='image-loading processes (default: %(default)s)')
    p.add_argument('--device', type=device_arg, default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu, cuda, cuda:1, ... (default: %(default)s)')
    p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                   help='progress bar on stderr (default: only on a terminal)')
    args = p.parse_args(argv)

    def check_threshold(rule: Optional[str]):
        if args.threshold is not None and rule == 'factor' and not 0 <= args.threshold <= 1:
            p.error(f'argument --threshold: must be in [0, 1] for --rule factor, as ood_factor is, got '
                    f'{args.threshold}' + ('' if args.rule else ' (the model decides with --rule factor by default; '
                                           'pass --rule spatial for a spatial_score threshold)'))
        if args.threshold is not None and rule == 'posterior':
            p.error('argument --threshold: the posterior rule takes no threshold (use --rule spatial or factor)')

    check_threshold(args.rule)
    if args.out and Path(args.out).suffix.lower() not in _Writer.SUFFIXES:
        p.error(f'--out {args.out}: name a .csv or .jsonl file (or omit --out for CSV on stdout)')

    from ..hub import WeightsError, load_model

    def fail(message: str):
        print(f'ssod predict: error: {message}', file=sys.stderr)
        raise SystemExit(2)

    try:
        paths = find_images(args.inputs)
        device = torch.device(args.device)
        model = load_model(args.model).to(device).eval()
    except (PredictError, WeightsError, FileNotFoundError, RuntimeError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    chosen_by = 'the --rule given'
    if args.rule is None:
        args.rule = default_rule(model)
        chosen_by = "the model's readout" if getattr(model, 'readout', None) else 'the default rule'
        check_threshold(args.rule)

    skipped = []
    counts = {'images': 0, 'unknown': 0}
    by_rule: Dict[str, int] = {}
    try:  # checks the threshold before the writer starts the output
        rows = predict(model, paths, args.threshold, args.rule, args.batch_size, device, args.workers,
                       args.progress, on_error=lambda path, err: (skipped.append(str(path)), print(
                           f'ssod predict: skipped {path}: not a readable image ({err})', file=sys.stderr)))
    except PredictError as e:
        fail(str(e))
    writer = _Writer(args.out)
    try:
        for row in rows:
            writer.write(row)
            counts['images'] += 1
            counts['unknown'] += row['label'] == UNKNOWN
            for r, u in row['_unknown'].items():
                by_rule[r] = by_rule.get(r, 0) + u
    except PredictError as e:
        fail(str(e))
    except BrokenPipeError:  # `ssod predict ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        raise SystemExit(1)
    finally:
        writer.close()
    if skipped and not counts['images']:
        fail(f'{"the one image given" if len(skipped) == 1 else f"each of the {len(skipped)} images given"} is '
             'unreadable (named above), so nothing was predicted')
    thresholds = rule_thresholds(model, args.rule, args.threshold)
    threshold = thresholds[args.rule]
    rule = (f'{READOUTS[args.rule].score} < {threshold:.4g}' if args.rule in READOUTS else 'posterior argmax') + \
        f', {chosen_by}'
    others = [f'{r} {by_rule[r]}' for r in RULES if r != args.rule and r in by_rule]
    print(f'{counts["images"]} image{"s" * (counts["images"] != 1)}, {counts["unknown"]} unknown ({rule})'
          f'{"; the other rules would say unknown for: " + ", ".join(others) if others else ""}'
          f'{f"; {len(skipped)} unreadable skipped" if skipped else ""}'
          f'{f"; wrote {args.out}" if args.out else ""}', file=sys.stderr)
    return {**counts, 'by_rule': by_rule, 'skipped': skipped, 'threshold': threshold, 'rule': args.rule}


if __name__ == '__main__':
    main()
