r"""OOD evaluation: SSOD's OOD factor against the post-hoc detectors, on the same backbone, in one table.

    ssod eval --model runs/ssod/best.pt --val-dir imagenet/val --ood-dirs inat sun places textures \
        --fit-dir imagenet/train --out eval_out

``--model`` is a training checkpoint, a hub-ready folder, ``hf-hub:org/repo`` or a registered name with weights.
The SSOD rows read the SSOD model six ways: the OOD factor of Eq. 15 (the paper's readout), the pooled
full posterior (Energy + log P_ID), its own Energy, and three per-position readouts (the mean MaxLogit of the
3 best positions, the study's choice; the best-position energy; and that plus log P_ID). The baselines (MSP,
MaxLogit, Energy, the two per-position classifier readouts, ODIN, ReAct, KNN, Mahalanobis, ViM) use
``--baseline-model`` if given (e.g. the plain cross-entropy model), else the same model. KNN, Mahalanobis, ViM
and ReAct are fitted on features of ``--fit-dir`` (ID training images); without it they are left out. Writes
``results.json``, ``results.md``, ``scores.csv`` and the plots to ``--out``. Metrics are percentages, with the
convention of :mod:`ssod_zoo.metrics` (ID positive; FPR95 = OOD accepted at 95% ID accepted).
"""
import argparse
import warnings
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import scores
from ..adapter import READOUTS, SSODModel
from ..hub import WeightsError, load_model
from ..detectors import DETECTORS, Detector, create_detector
from ..metrics import accuracy, ood_metrics
from .protocols import PROTOCOLS, DataMissing, Transformed, add_fpr95_openood, fpr95_markdown, limited, load_protocol, \
    skipped_markdown
from ..output import posterior_score, spatial_maxlogit_score, spatial_posterior_score
from .cli import AT_LEAST_0, AT_LEAST_1, CROP_PCT, HelpFormatter, bounded, device as device_arg
from .images import (ImageError, ImageFiles, class_folder, class_key, one_line, ood_set_names, unreadable,
                     unreadable_report)
from .report import MODELS, baseline_of, deployed_thresholds, deployment_report, fit_detectors, method_label, \
    write_scores_csv

__all__ = ['calibrate', 'collect', 'ssod_report', 'evaluate', 'METHODS', 'results_markdown', 'main']

# Readouts of the SSOD model (scored on its own outputs), then the post-hoc baselines (on the baseline model).
# 'ssod_spatial_top3' (chosen with its recipe on the synthetic OOD validation sets by benchmarks/study.py): the mean
# MaxLogit of the 3 best feature-map positions (ssod_zoo.spatial_maxlogit_score); 'ssod' is the paper's Eq. 15, the
# OOD factor alone; 'ssod_spatial_energy' is the best position's Energy, max_p logsumexp(z(p)); 'ssod_spatial' and
# 'ssod_posterior' use both factors of Eq. 7 (ssod_zoo.spatial_posterior_score at the best position,
# ssod_zoo.posterior_score on pooled features); 'ssod_energy' scores the SSOD model's pooled logits by Energy.
# 'maxlogit_spatial_top3' and 'energy_spatial' are the same classifier-only position readouts on the CE model: the
# post-hoc baselines that tell what SSOD training adds to the readout itself.
SSOD_READOUTS = {
    'ssod_spatial_top3': lambda o: o['spatial_top3'],
    'ssod': lambda o: o['ood_factor'],
    'ssod_spatial_energy': lambda o: o['spatial_energy'],
    'ssod_spatial': lambda o: o['spatial_posterior'],
    'ssod_posterior': lambda o: posterior_score(o['logits'], o['ood_factor'], 'energy'),
    'ssod_energy': lambda o: scores.energy(o['logits']),
}
# the study's classifier-only readouts on any baseline model: not pooled-feature detectors, so not in DETECTORS
SPATIAL_BASELINES = {'maxlogit_spatial_top3': lambda o: o['spatial_top3'],
                     'energy_spatial': lambda o: o['spatial_energy']}
SPATIAL_READOUTS = ('ssod_spatial_top3', 'ssod_spatial_energy', 'ssod_spatial')  # read from forward_positions
METHODS = (*SSOD_READOUTS, 'msp', 'maxlogit', 'energy', *SPATIAL_BASELINES, 'odin', 'react', 'knn', 'mahalanobis',
           'vim')
FITTED = tuple(m for m in METHODS if m in DETECTORS and DETECTORS[m].needs_fit)


@torch.no_grad()
def collect(
        model: nn.Module,
        loader: Iterable,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        progress: Optional[str] = None,
        spatial: bool = False,
) -> Dict[str, torch.Tensor]:
    """One pass over a loader, keeping what every score needs (on CPU, float32).

    Returns:
        dict with ``logits`` (N, M), ``ood_factor`` (N,), ``features`` (N, D) pooled pre-logits and
        ``targets`` (N,); with ``spatial``, also ``spatial_posterior`` and ``spatial_energy`` (N,), the best
        position's full posterior and Energy (:func:`ssod_zoo.spatial_posterior_score`), and ``spatial_top3``
        (N,), the mean MaxLogit of the 3 best positions (:func:`ssod_zoo.spatial_maxlogit_score`).
    """
    model.eval()
    out = {'logits': [], 'ood_factor': [], 'features': [], 'targets': []}
    spatial = spatial and hasattr(model, 'forward_positions')  # a plain timm baseline has no per-position heads
    if spatial:
        out.update(spatial_posterior=[], spatial_energy=[], spatial_top3=[])
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for x, y in _bar(loader, progress):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            features = model.forward_features(x)
            pre_logits = model.forward_head(features, pre_logits=True)
            logits = model.get_classifier()(pre_logits)  # timm's heads end in the classifier: one head pass
            ood_factor = model.forward_ood(pre_logits)
            if spatial:  # the per-position heads in float32 whatever the autocast, as spatial_score runs them
                cls_map, ood_map = model._heads_without_autocast(model.forward_positions, features)
        if spatial:
            extra = (spatial_posterior_score(cls_map, ood_map), spatial_posterior_score(cls_map),
                     spatial_maxlogit_score(cls_map))
        for k, v in zip(out, (logits, ood_factor, pre_logits, y, *(extra if spatial else ()))):
            out[k].append(v.float().cpu() if v.is_floating_point() else v.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


# each readout's score (ssod_zoo.adapter.READOUTS) among the outputs of collect(..., spatial=True)
COLLECTED = {'spatial': 'spatial_top3', 'factor': 'ood_factor'}


def calibrate(model: nn.Module, loader: Iterable, device: torch.device, ood_head: bool = True,
              progress: Optional[str] = None) -> Dict[str, Optional[float]]:
    """The model's rejection thresholds, each keeping 95% of the ID validation images in ``loader``:
    ``spatial_threshold`` on ``model.spatial_score`` and, when ``ood_head`` (its OOD head was trained),
    ``ood_threshold`` on ``ood_factor``; None for an untrained head."""
    return thresholds_of(collect(model, loader, device, spatial=True, progress=progress), ood_head)


def thresholds_of(out: Dict[str, torch.Tensor], ood_head: bool = True) -> Dict[str, Optional[float]]:
    """:func:`calibrate` on the outputs of ``collect(..., spatial=True)`` already at hand."""
    from ..hub import calibrate_threshold
    return {r.attribute: calibrate_threshold(out[COLLECTED[name]]) if ood_head or name != 'factor' else None
            for name, r in READOUTS.items()}


def ssod_report(id_out: Dict[str, torch.Tensor], ood_outs: Dict[str, Dict[str, torch.Tensor]]) -> dict:
    """ID accuracy and SSOD's OOD metrics per OOD set and on average, all in percent (the paper's tables)."""
    report = {'id_accuracy': 100 * accuracy(id_out['logits'], id_out['targets']), 'ood': {}}
    for name, o in ood_outs.items():
        report['ood'][name] = _percent(ood_metrics(id_out['ood_factor'], o['ood_factor']))
    if report['ood']:
        report['ood_average'] = _average(report['ood'].values())
    return report


def score_images(detector: Detector, model: nn.Module, loader: Iterable, device: torch.device,
                 progress: Optional[str] = None, pixel_units: bool = True) -> torch.Tensor:
    """Detectors that need the images again (ODIN: an input-gradient step per batch) get their own pass, with the
    std the images were normalised with (the model's preprocessing, as every loader here applies it) when
    ``pixel_units``; a std that does not match the images' channels is left out, with a warning."""
    model.eval()
    logits_fn = _logits_fn(model)
    std = (getattr(model, 'pretrained_cfg', None) or {}).get('std') if pixel_units else None
    scored = []
    for x, _ in _bar(loader, progress):
        if std is not None and len(std) != x.shape[1]:
            warnings.warn(f'{type(detector).__name__}: the model\'s normalisation std has {len(std)} values for '
                          f'{x.shape[1]}-channel images, so its step is taken in the images\' own units')
            std = None
        scored.append(detector.score_images(logits_fn, x.to(device), std=std).cpu())
    return torch.cat(scored)


def evaluate(
        ssod_model: nn.Module,
        id_loader: DataLoader,
        ood_loaders: Dict[str, DataLoader],
        baseline_model: Optional[nn.Module] = None,
        fit_loader: Optional[DataLoader] = None,
        device: torch.device = torch.device('cpu'),
        methods: Iterable[str] = METHODS,
        progress: bool = True,
        knn_k: int = 50,
        odin_pixel_units: bool = True,
) -> dict:
    """Score ID and OOD data with SSOD and every baseline; metrics per OOD set and averaged.

    The fitted detectors are sized to the fit set (:func:`ssod_zoo.app.report.fit_detectors`: KNN's ``knn_k`` is
    capped below the smallest class, with a warning; small fit sets for Mahalanobis/ViM are flagged).
    ``odin_pixel_units``: ODIN's step divided by the baseline model's normalisation std, the paper's units (False:
    in the normalised images' units, as every study record before the twenty-sixth session took it).

    Returns:
        ``{'id_accuracy': {'ssod': %, 'ce' or 'baseline': %}, 'ood': {set: {method: {fpr95, auroc, aupr_in, aupr_out}},
        'average': {...}}, 'scores': {method: {'id': (N,), set: (N_set,)}}, 'detectors': {method: str}}``; ``scores``
        is for plots, ``detectors`` each post-hoc baseline as it ran (its repr: KNN's k after its cap, ...).
    """
    baseline_model = baseline_model or ssod_model
    methods = [m for m in methods if fit_loader is not None or m not in FITTED]
    if not hasattr(baseline_model, 'forward_positions'):
        methods = [m for m in methods if m not in SPATIAL_BASELINES]
    tag = (lambda s: s) if progress else (lambda s: None)
    # the per-position heads run only for the readouts that read them (a pass over every feature-map position)
    base_spatial = any(m in SPATIAL_BASELINES for m in methods)
    ssod_spatial = any(m in SPATIAL_READOUTS for m in methods) or (base_spatial and baseline_model is ssod_model)
    ssod_out = {'id': collect(ssod_model, id_loader, device, progress=tag('SSOD model: ID'), spatial=ssod_spatial)}
    ssod_out.update({k: collect(ssod_model, v, device, progress=tag(f'SSOD model: {k}'), spatial=ssod_spatial)
                     for k, v in ood_loaders.items()})
    if baseline_model is ssod_model:
        base_out = ssod_out
    else:
        base_out = {'id': collect(baseline_model, id_loader, device, progress=tag('baseline: ID'),
                                  spatial=base_spatial)}
        base_out.update({k: collect(baseline_model, v, device, progress=tag(f'baseline: {k}'), spatial=base_spatial)
                         for k, v in ood_loaders.items()})

    # the post-hoc detectors, looked up by name (ssod_zoo.detectors); the fitted ones sized to the fit set
    detectors = {m: create_detector(m) for m in methods if m in DETECTORS and not DETECTORS[m].needs_fit}
    if any(m in FITTED for m in methods):
        fit = collect(baseline_model, fit_loader, device, progress=tag('baseline: fit set'))
        detectors.update(fit_detectors(fit['features'], fit['targets'], baseline_model.get_classifier(), knn_k,
                                       [m for m in methods if m in FITTED]))

    def score(method: str, o: Dict[str, torch.Tensor], loader) -> torch.Tensor:
        if method in SSOD_READOUTS:
            return SSOD_READOUTS[method](o)
        if method in SPATIAL_BASELINES:
            return SPATIAL_BASELINES[method](o)
        detector = detectors[method]
        if detector.needs_images:
            return score_images(detector, baseline_model, loader, device, progress=tag(method),
                                pixel_units=odin_pixel_units)
        return detector.score(o['features'], o['logits'])

    loaders = {'id': id_loader, **ood_loaders}
    all_scores = {}
    for m in methods:
        source = ssod_out if m in SSOD_READOUTS else base_out
        all_scores[m] = {k: score(m, source[k], loaders[k]) for k in loaders}
    # the baselines as they ran: a fitted one's size (KNN's k after its cap, ViM's dimension), ODIN's step units
    ran = {m: repr(d) for m, d in detectors.items()}
    if 'odin' in ran:
        ran['odin'] += ' (step / std)' if odin_pixel_units else ' (step in normalised units)'
    results = {'id_accuracy': {'ssod': 100 * accuracy(ssod_out['id']['logits'], ssod_out['id']['targets'])},
               'ood': {}, 'scores': all_scores, 'detectors': ran}
    if baseline_model is not ssod_model:
        trained = isinstance(baseline_model, SSODModel) and getattr(baseline_model, 'ood_head_trained', True)
        base_id = base_out['id']
        results['id_accuracy']['baseline' if trained else 'ce'] = 100 * accuracy(base_id['logits'], base_id['targets'])
    for name in ood_loaders:
        results['ood'][name] = {m: _percent(ood_metrics(all_scores[m]['id'], all_scores[m][name])) for m in methods}
    results['ood']['average'] = {m: _average(results['ood'][s][m] for s in ood_loaders) for m in methods}
    return results


def results_markdown(results: dict) -> str:
    """The paper's layout: one row per method, FPR95 / AUROC per OOD set, then the average."""
    sets = [s for s in results['ood'] if s != 'average'] + ['average']
    methods = list(results['ood']['average'])
    head = '| Method | ' + ' | '.join(f'{s} FPR95↓ | {s} AUROC↑' for s in sets) + ' |'
    rule = '|---|' + '---:|---:|' * len(sets)
    rows = []
    best = {s: min(results['ood'][s][m]['fpr95'] for m in methods) for s in sets}
    for m in methods:
        cells = []
        for s in sets:
            r = results['ood'][s][m]
            fpr = f'{r["fpr95"]:.2f}'
            cells += [f'**{fpr}**' if r['fpr95'] == best[s] else fpr, f'{r["auroc"]:.2f}']
        rows.append(f'| {method_label(m, baseline_of(results["id_accuracy"]))} | ' + ' | '.join(cells) + ' |')
    acc = ', '.join(f'{MODELS[k]} {v:.2f}%' for k, v in results['id_accuracy'].items())
    ran = results.get('detectors') or {}
    return '\n'.join([f'ID accuracy: {acc}', '', head, rule, *rows, '',
                      'FPR95: OOD images accepted at the threshold that accepts 95% of ID images (lower is '
                      'better); AUROC: higher is better; percentages. Bold: best FPR95 per column.',
                      *(['', 'The baselines as they ran: ' + '; '.join(f'`{m}` {r}' for m, r in ran.items()) + '.']
                        if ran else [])])


def write_results(results: dict, out_dir: Path, config: dict, extra: Optional[dict] = None,
                  sections: Sequence[str] = ()) -> dict:
    """results.json (without raw scores, with ``extra`` keys) and results.md (the table, then ``sections``);
    returns what was written to JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {'id_accuracy': results['id_accuracy'], 'ood': results['ood'], 'config': config,
               **({'detectors': results['detectors']} if results.get('detectors') else {}), **(extra or {})}
    (out_dir / 'results.json').write_text(json.dumps(payload, indent=2))
    (out_dir / 'results.md').write_text('\n\n'.join([results_markdown(results), *sections]) + '\n')
    return payload


def _logits_fn(model: nn.Module):
    def fn(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x))
    return fn


def _percent(metrics: Dict[str, float]) -> Dict[str, float]:
    return {k: 100 * float(v) for k, v in metrics.items()}


def _average(rows: Iterable[Dict[str, float]]) -> Dict[str, float]:
    rows = list(rows)
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _bar(loader, desc: Optional[str]):
    if not desc or not sys.stderr.isatty():  # piped to a file: no wall of carriage returns
        return loader
    from tqdm.auto import tqdm
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------ CLI
def in_model_order(ds, model):
    """An ImageFolder ``ds`` whose class folders are the model's label names up to case and punctuation (each
    :func:`~ssod_zoo.app.images.class_key` once), relabelled with the model's class indices and names: ImageFolder
    numbers the folders in sorted order, the model's classes may be in another. Any other ``ds`` as it is."""
    names = [str(c) for c in (model.pretrained_cfg.get('label_names') or ())]
    keys = [class_key(c) for c in ds.classes]
    index = {class_key(n): i for i, n in enumerate(names)}
    if not names or list(ds.classes) == names or len(index) != len(names) or sorted(keys) != sorted(index):
        return ds
    order = [index[k] for k in keys]
    ds.samples = ds.imgs = [(path, order[t]) for path, t in ds.samples]
    ds.targets = [t for _, t in ds.samples]
    ds.classes, ds.class_to_idx = names, {n: i for i, n in enumerate(names)}
    return ds


def _norm(model: nn.Module) -> str:
    """A model's normalisation, as its pretrained_cfg gives it: ``(mean) / (std)``."""
    return ' / '.join(str(tuple(float(v) for v in model.pretrained_cfg.get(k) or ())) for k in ('mean', 'std'))


def _class_names(ds: Dataset) -> List[str]:
    """The class names of a data set, through the wrappers (Subset, Transformed) around it; [] when it has none."""
    while not hasattr(ds, 'classes') and hasattr(ds, 'dataset'):
        ds = ds.dataset
    return [str(c) for c in getattr(ds, 'classes', None) or ()]


def _check_class_folders(p: argparse.ArgumentParser, which: str, model, classes: List[str],
                         val_dir: Optional[str], protocol: Optional[str]) -> None:
    """Stop when the ID set cannot be the model's classes; warn when its folder names are not the model's labels.
    ImageFolder numbers the class folders in sorted order, and ID accuracy takes folder i for the model's class i
    (folders named as the model's classes were put in its order by :func:`in_model_order`)."""
    names = [str(c) for c in (model.pretrained_cfg.get('label_names') or ())]
    expected = f' (its classes, in order: {", ".join(names)})' if names else ''
    if model.num_classes != len(classes):
        p.error(f'{which} has {model.num_classes} classes, {val_dir or protocol} has {len(classes)}: the ID set needs '
                f'one sub-folder per class of the model{expected}, each holding that class\'s images')
    if val_dir is None or not names or names == list(classes):  # (folders named as the classes: in_model_order)
        return
    index = {class_key(n): j for j, n in enumerate(names)}  # up to case and punctuation, as in_model_order matches
    moved = [(c, i, index[class_key(c)]) for i, c in enumerate(classes) if index.get(class_key(c), i) != i]
    if moved:  # a folder named after one of the model's classes would be graded as another
        c, i, j = moved[0]
        p.error(f'{val_dir}: folder {c!r} is number {i} in sorted order, so ID accuracy would take it for the '
                f'model\'s class {j} of {names[j]!r}, not its own{expected}; the folders must be the model\'s classes, '
                'in its order')
    warnings.warn(f'the class folders of {val_dir} ({", ".join(classes)}) are not the label names of {which}'
                  f'{expected}; ID accuracy and the per-class fits take folder i, in sorted order, as class i')


def main(argv: Optional[List[str]] = None) -> dict:
    import timm
    p = argparse.ArgumentParser(prog='ssod eval', description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--model', required=True, help='SSOD model: checkpoint, hub folder, hf-hub:..., or name')
    p.add_argument('--baseline-model', help='model for the post-hoc baselines (default: --model)')
    p.add_argument('--val-dir', help='ID test images, ImageFolder layout (or --protocol)')
    p.add_argument('--ood-dirs', nargs='+', default=[],
                   help='one folder per OOD set: every image under it, flat or in sub-folders')
    p.add_argument('--protocol', choices=PROTOCOLS, help='a named protocol on real data (ssod_zoo.app.protocols)')
    p.add_argument('--data-root', help='where the protocol data sets live (default: $SSOD_ZOO_DATA or ./data)')
    p.add_argument('--download', action='store_true', help='with --protocol: fetch what torchvision can download')
    p.add_argument('--openood-root', help="OpenOOD v1.5's data/ folder: --protocol on OpenOOD's image lists")
    p.add_argument('--limit', type=bounded(int, *AT_LEAST_0), default=0,
                   help='at most this many images per test set (the ID set and each OOD set), drawn at random with '
                        'seed 0; 0 = all')
    p.add_argument('--fit-dir', help='ID training images to fit KNN, Mahalanobis, ViM and ReAct on')
    p.add_argument('--fit-limit', type=bounded(int, *AT_LEAST_0), default=0,
                   help='use at most this many fit images, the same number from each class (0 = all)')
    p.add_argument('--out', default='eval_out', help='output folder')
    p.add_argument('--img-size', type=bounded(int, *AT_LEAST_1), default=None,
                   help='default: the model pretrained_cfg input size')
    p.add_argument('--crop-pct', type=bounded(float, *CROP_PCT), default=None,
                   help="default: the model's pretrained_cfg crop_pct")
    p.add_argument('--batch-size', type=bounded(int, *AT_LEAST_1), default=64, help='images per forward pass')
    p.add_argument('--workers', type=bounded(int, *AT_LEAST_0), default=2, help='image-loading processes')
    p.add_argument('--device', type=device_arg, default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu, cuda, cuda:1, ...')
    p.add_argument('--no-plots', action='store_true', help='skip roc.png and histograms.png')
    p.add_argument('--knn-k', type=bounded(int, *AT_LEAST_1), default=50,
                   help='KNN neighbour; capped below the smallest fit class, with a warning (default: %(default)s)')
    p.add_argument('--bootstrap', type=bounded(int, *AT_LEAST_0), default=1000,
                   help='bootstrap resamples for the FPR95/AUROC intervals, seed 0; 0 = none (default: %(default)s)')
    args = p.parse_args(argv)
    protocol = None
    if args.protocol:
        try:  # before the models load: a missing data set costs nothing
            protocol = load_protocol(args.protocol, args.data_root, args.download, openood_root=args.openood_root)
        except DataMissing as e:
            print(f'ssod eval: error: {e}', file=sys.stderr)
            raise SystemExit(2)
        for name, why in protocol.skipped.items():  # optional parts: the run goes on without them
            print(f'ssod eval: skipping {name}: {why}', file=sys.stderr)
    elif not args.val_dir or not args.ood_dirs:
        p.error('give --protocol NAME, or --val-dir and --ood-dirs')
    for d in [] if protocol else [args.val_dir, *args.ood_dirs, *([args.fit_dir] if args.fit_dir else [])]:
        if not Path(d).is_dir():
            p.error(f'{d} is not a directory')
    ood_names = ood_set_names(args.ood_dirs)
    if not protocol and len(set(ood_names)) < len(ood_names):
        p.error(f'--ood-dirs: {", ".join(args.ood_dirs)} name the same folder twice')

    def fail(e: BaseException):
        print(f'ssod eval: error: {one_line(e)}', file=sys.stderr)
        raise SystemExit(2)

    t0 = time.time()
    device = torch.device(args.device)
    try:
        model = load_model(args.model).to(device).eval()
        baseline = load_model(args.baseline_model).to(device).eval() if args.baseline_model else None
    except (WeightsError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: no weights for a tag, no CUDA
        fail(e)
    trained = tuple(model.pretrained_cfg.get('input_size') or ())
    calibrated = any(t is not None for t in deployed_thresholds(model).values())
    size_note = ''
    if args.img_size and trained and trained[-1] != args.img_size and calibrated:
        warnings.warn(f'{args.model} was trained and its thresholds calibrated at {trained[-1]} px; scoring at '
                      f'{args.img_size} px shifts its scores, so accept rates at its thresholds will differ')
        size_note = (f'**Scored at {args.img_size} px, with thresholds calibrated at {trained[-1]} px.** The scores '
                     'shift with the input size, so these rates are not what a deployment at either size would see: '
                     f'recalibrate at {args.img_size} px before relying on them.')
    if not getattr(model, 'ood_head_trained', True):
        warnings.warn(f'{args.model} was trained with cross-entropy alone (ood_head_trained is False): its OOD head '
                      'was never trained, so the rows built on its ood_factor (the OOD factor, the posteriors) '
                      'measure nothing; read its position rows, and the post-hoc baselines')
    data_args = {k: v for k, v in {'input_size': args.img_size and (3, args.img_size, args.img_size),
                                   'crop_pct': args.crop_pct}.items() if v}
    data_config = timm.data.resolve_data_config(data_args, model=model)
    transform = timm.data.create_transform(**data_config)
    for flag, m in (('--model', model), ('--baseline-model', baseline)):
        try:  # what model(x) refuses: an input smaller than the network's stride, which eval's passes never check
            if m is not None:
                m._check_input(torch.zeros(1, *data_config['input_size'], device=device))
        except ValueError as e:
            p.error(f'--img-size {data_config["input_size"][-1]}: {flag}: {e}')

    def loader(path, limit=0, labelled=False, per_class=False):
        if isinstance(path, Dataset):
            ds = Transformed(path, transform)
        else:  # ID sets need their class folders; an OOD set is every image under its folder
            ds = in_model_order(class_folder(path, transform), model) if labelled else ImageFiles(path, transform)
        ds = limited(ds, limit, _targets(ds) if per_class and limit else None)
        return DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)

    try:
        val = loader(protocol.test if protocol else args.val_dir, labelled=True)
    except ImageError as e:
        fail(e)
    labels = [[class_key(c) for c in (m.pretrained_cfg.get('label_names') or ())] for m in (model, baseline) if m]
    if len(labels) == 2 and labels[0] != labels[1] and sorted(labels[0]) == sorted(labels[1]):
        p.error(f'--model {args.model} and --baseline-model {args.baseline_model} order their classes differently, '
                'so one of them would be graded against the wrong labels: give a baseline with the model\'s class '
                'order')
    if baseline is not None and _norm(baseline) != _norm(model):
        p.error(f'--baseline-model {args.baseline_model} normalises its images with mean/std {_norm(baseline)}, '
                f'--model {args.model} with {_norm(model)}: both are scored on the same images, preprocessed for '
                '--model, so the baselines would read wrongly normalised ones; give a baseline trained with the same '
                'normalisation')
    for flag, m in (('--model', model), ('--baseline-model', baseline)):
        if m is not None:
            _check_class_folders(p, f'{flag} {getattr(args, flag[2:].replace("-", "_"))}', m, val.dataset.classes,
                                 None if protocol else args.val_dir, args.protocol)
    try:
        oods = {n: loader(d, args.limit) for n, d in zip(ood_names, args.ood_dirs)}
        fit = loader(args.fit_dir, args.fit_limit, labelled=True, per_class=True) if args.fit_dir else None
    except ImageError as e:
        fail(e)
    fit_classes, id_classes = (_class_names(d.dataset) if d else [] for d in (fit, val))
    # a protocol's ID classes may be indices ('0'..'999'): there, the folders sort into them, and only count
    differs = (len(fit_classes) != len(id_classes) if protocol else
               list(map(class_key, fit_classes)) != list(map(class_key, id_classes)))
    if args.fit_dir and id_classes and differs:
        fit_keys, id_keys = set(map(class_key, fit_classes)), set(map(class_key, id_classes))
        missing = [c for c in id_classes if class_key(c) not in fit_keys][:5]
        extra = [c for c in fit_classes if class_key(c) not in id_keys][:5]
        said = '; '.join(x for x in (missing and f'lacks {", ".join(missing)}',
                                     extra and f'has {", ".join(extra)} that the ID set has not') if x)
        p.error(f'--fit-dir {args.fit_dir} must have the ID set\'s classes: {said or "another order"} '
                f'({len(fit_classes)} against {len(id_classes)} classes); KNN, Mahalanobis, ViM and ReAct are fitted '
                'per class')
    if args.limit and not protocol:  # after the class check, which needs the whole ImageFolder
        val = loader(args.val_dir, args.limit, labelled=True)
    if protocol:
        val = loader(protocol.test, args.limit) if args.limit else val
        oods = {k: loader(v, args.limit) for k, v in protocol.ood.items()}
        if protocol.fit is not None and not args.fit_dir:
            fit = loader(protocol.fit, args.fit_limit, per_class=True)
    if fit is None:
        warnings.warn(f'no --fit-dir, so {", ".join(FITTED)} are left out (each is fitted on ID training '
                      'features): pass --fit-dir with ID training images, one sub-folder per class, to score them')
    # every image found is scored, so an unreadable one stops the run: a header check of each file first, and when
    # one fails later (a file cut short), every file is decoded, so that all of them are named in one go
    files = [f for ds in (val, *oods.values(), *([fit] if fit else [])) for f in _paths(ds.dataset)]

    def unreadable_stop(first: str):
        report = unreadable_report(files) or f'{first}. Fix or delete it and run again'
        print(f'ssod eval: error: {report} (ssod eval scores every image it finds; ssod predict skips unreadable '
              'ones)', file=sys.stderr)
        raise SystemExit(2)

    for path, why in unreadable(files, decode=False):
        unreadable_stop(f'cannot read image {path} ({why})')
    try:
        results = add_fpr95_openood(evaluate(model, val, oods, baseline, fit, device, knn_k=args.knn_k))
    except ImageError as e:  # a corrupt file, read in a DataLoader worker
        unreadable_stop(one_line(e))
    out = Path(args.out)
    # what a deployment decides with: sample counts, accept rates at the model's own thresholds, intervals
    deployment, deployment_keys = deployment_report(results['scores'], results['ood'], model, args.bootstrap,
                                                    baseline=baseline_of(results['id_accuracy']), note=size_note)
    extra = {'skipped': protocol.skipped, 'groups': protocol.groups} if protocol else {}
    sections = [fpr95_markdown(results)]  # both FPR95 conventions, and what the protocol could not run
    if protocol and protocol.skipped:
        sections.append(skipped_markdown(protocol.skipped))
    if fit is None:
        sections.append(f'Left out: {", ".join(FITTED)}, which are fitted on ID training images (no `--fit-dir`).')
    payload = write_results(
        results, out, {'model': args.model, 'baseline_model': args.baseline_model, **vars(args), **extra},
        extra=deployment_keys,
        sections=[*sections, deployment])
    loaders = {'id': val, **oods}
    id_targets = _targets(val.dataset)
    write_scores_csv(results['scores'], {k: _rows(v.dataset) for k, v in loaders.items()}, out / 'scores.csv',
                     targets={'id': torch.as_tensor(id_targets)} if id_targets else None)
    if not args.no_plots:
        from .plots import plot_histograms, plot_roc
        plot_roc(results['scores'], out / 'roc.png', baseline=baseline_of(results['id_accuracy']))
        plot_histograms(results['scores'], out / 'histograms.png', thresholds=deployed_thresholds(model))
    print(results_markdown(results))
    print('\n' + sections[0])  # FPR95 in both conventions: ID positive (the paper's) and OOD positive (OpenOOD's)
    print('\n' + deployment)
    from .calibrate import FEW, spread_points
    for name, n in [('ID set', len(val.dataset))] + [(f'OOD set {k}', len(v.dataset)) for k, v in oods.items()]:
        if n < FEW:
            print(f'ssod eval: warning: only {n} images in the {name}: a rate measured on it (FPR95, accept rate) is '
                  f'uncertain by up to {spread_points(n):.0f} points (one sd), and the bootstrap intervals '
                  'cannot show what so few images leave out; use a few hundred', file=sys.stderr)
    print(f'\nwrote {out}/results.json, results.md, scores.csv{"" if args.no_plots else ", roc.png, histograms.png"} '
          f'in {time.time() - t0:.0f} s', file=sys.stderr)
    return payload


def _paths(ds) -> List[str]:
    """The image file of each item, in loader order, where the dataset says ([] where it does not)."""
    return _column(ds, _files)


def _files(ds) -> Optional[List[str]]:
    """The image files of a data set that lists its own (ours, ImageFolder's), or None."""
    return ([str(p) for p in ds.paths] if hasattr(ds, 'paths') else
            [str(p) for p, _ in ds.samples] if hasattr(ds, 'samples') else None)


def _rows(ds) -> List[str]:
    """What each item is, in loader order, for ``scores.csv``: its image file (:func:`_paths`), or for an item of an
    in-memory data set (a protocol's), its row there, as ``FashionMNIST(test)[1234]``."""
    return _column(ds, lambda d: _files(d) or (None if hasattr(d, 'dataset') else _row_names(d)))


def _row_names(ds) -> List[str]:
    """``Name(split, seed s)[i] kind`` for each row ``i`` of a data set read from no files, with what of these it
    has: a torchvision set's split (``train`` or ``split``), a generated set's seed and an item's kind."""
    split = getattr(ds, 'split', None) or {True: 'train', False: 'test'}.get(getattr(ds, 'train', None))
    seed = getattr(ds, 'seed', None)
    tags = ', '.join(t for t in (split, None if seed is None else f'seed {seed}') if isinstance(t, str))
    kind = getattr(ds, 'kind', None)
    return [f'{type(ds).__name__}{f"({tags})" if tags else ""}[{i}]{f" {kind(i)}" if callable(kind) else ""}'
            for i in range(len(ds))]


def _targets(ds) -> List[int]:
    """The label of each item, in loader order, where the dataset says ([] where it does not)."""
    return _column(ds, lambda d: [int(t) for t in d.targets] if hasattr(d, 'targets') else None)


def _column(ds, own: Callable[[Dataset], Optional[list]]) -> list:
    """A per-item column of ``ds``: ``own(ds)``, else that of the dataset it wraps, through the ``indices`` of a
    wrapper that selects rows (a ``Subset``, a protocol's class selection). [] if no layer has it, or if a wrapper
    selects rows without saying which (the lengths differ)."""
    found = own(ds)
    if found is None and hasattr(ds, 'dataset'):
        inner = _column(ds.dataset, own)
        found = [inner[int(i)] for i in ds.indices] if inner and hasattr(ds, 'indices') else inner
    return found if found is not None and len(found) == len(ds) else []


if __name__ == '__main__':
    main()
