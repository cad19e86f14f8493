"""What a user decides with, beside FPR95 and AUROC: accept rates at the model's own thresholds, sample counts,
bootstrap confidence intervals, per-image scores, and fitted detectors sized to the fit set.

Conventions are :mod:`ssod_zoo.metrics`' (higher score = more ID, ID positive, FPR95 = fraction of OOD accepted at
the threshold that accepts 95% of ID, ties accepted). Percentages throughout, as in ``results.json``.
"""
import csv
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import scores as _scores
from ..adapter import READOUTS
from ..detectors import Detector, create_detector

__all__ = ['DEPLOYED', 'accept_rates', 'deployed_thresholds', 'bootstrap_metrics', 'bootstrap_ci',
           'confidence_intervals', 'deployment_report', 'fit_detectors', 'report_markdown', 'write_scores_csv']


# the SSOD model's readouts a deployment thresholds, by ssod_zoo.app.evaluate's method names, in the order reports
# give them
DEPLOYED = {'ssod_spatial_top3': READOUTS['spatial'], 'ssod': READOUTS['factor']}


def accept_rates(scores: Mapping[str, torch.Tensor], threshold: Optional[float]) -> Dict[str, dict]:
    """Per set: images, and the percentage kept by ``score >= threshold`` (what a deployment sees).

    Args:
        scores: set name -> (N,) scores of one readout ('id' included), higher = more in-distribution.
        threshold: the model's calibrated threshold for that readout; None gives counts only.
    """
    return {k: {'n': int(v.numel()),
                'accepted': None if threshold is None else 100 * float((v >= threshold).double().mean())}
            for k, v in scores.items()}


def _counts(n: int, n_boot: int, generator: torch.Generator) -> torch.Tensor:
    """(n_boot, n) how often each item is drawn in each resample (n draws with replacement); float32 is exact."""
    idx = torch.randint(n, (n_boot, n), generator=generator)
    return torch.zeros(n_boot, n).scatter_add_(1, idx, torch.ones(n_boot, n))


def bootstrap_metrics(id_scores: torch.Tensor, ood_scores: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                      tpr: float = 0.95, chunk: int = 0) -> Dict[str, torch.Tensor]:
    """FPR95 and AUROC of ``n_boot`` bootstrap resamples (ID and OOD resampled separately), vectorised.

    A resample is a vector of draw counts over the sorted scores (ID descending, OOD ascending), so nothing is
    re-sorted: AUROC = sum_i w_i (W_ood(< s_i) + W_ood(= s_i) / 2) / (n_id n_ood), and FPR95 is W_ood(>= t) / n_ood
    at the resample's own threshold t, the ceil(tpr n_id)-th largest drawn ID score (metrics.fpr_at_tpr's rule).
    Resample b equals drawing ``sorted_id[randint]`` and ``sorted_ood[randint]`` from the seeded generator.

    Args:
        id_scores: (N_id,); ood_scores: (N_ood,); higher = more in-distribution.
        n_boot: resamples; seed: their generator's seed (same seed, same intervals).
        chunk: resamples per vectorised block (0 = sized to ~16M elements).

    Returns:
        ``{'fpr95': (n_boot,), 'auroc': (n_boot,)}`` as fractions in [0, 1].
    """
    s_id = torch.as_tensor(id_scores).detach().double().cpu().flatten()
    s_ood = torch.as_tensor(ood_scores).detach().double().cpu().flatten()
    n1, n0 = s_id.numel(), s_ood.numel()
    if n1 == 0 or n0 == 0:
        raise ValueError('bootstrap needs at least one ID and one OOD score')
    gen = torch.Generator().manual_seed(seed)
    ood_sorted = s_ood.sort().values
    id_desc = s_id.sort(descending=True).values
    lo = torch.searchsorted(ood_sorted, id_desc, right=False)  # OOD strictly below each ID score
    hi = torch.searchsorted(ood_sorted, id_desc, right=True)  # ... or equal
    keep = max(1, math.ceil(round(tpr * n1, 6)))
    chunk = chunk or max(1, (1 << 24) // max(n1, n0))
    fpr, auc = [], []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w_id, w_ood = _counts(n1, b, gen), _counts(n0, b, gen)
        cum = torch.cat([torch.zeros(b, 1), w_ood.cumsum(1)], dim=1)  # (b, n0 + 1): drawn OOD below position j
        below = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])  # (b, n1) drawn OOD below / tied with each ID
        auc.append((w_id.double() * below.double()).sum(1) / (n1 * n0))
        # threshold: the first ID score (descending) where the drawn ID count reaches `keep`
        t = id_desc[(w_id.cumsum(1) >= keep).float().argmax(1)]
        accepted = n0 - cum.gather(1, torch.searchsorted(ood_sorted, t, right=False).unsqueeze(1)).squeeze(1)
        fpr.append(accepted.double() / n0)
    return {'fpr95': torch.cat(fpr), 'auroc': torch.cat(auc)}


def bootstrap_ci(id_scores: torch.Tensor, ood_scores: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Dict[str, List[float]]:
    """Percentile bootstrap intervals, in percent: ``{'fpr95': [lo, hi], 'auroc': [lo, hi]}``."""
    boot = bootstrap_metrics(id_scores, ood_scores, n_boot, seed)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    return {k: [100 * float(x) for x in torch.quantile(v, q)] for k, v in boot.items()}


def confidence_intervals(all_scores: Mapping[str, Mapping[str, torch.Tensor]], n_boot: int = 1000,
                         seed: int = 0) -> Dict[str, Dict[str, dict]]:
    """``{set: {method: {'fpr95': [lo, hi], 'auroc': [lo, hi]}}}`` for every method and OOD set of ``evaluate``."""
    out: Dict[str, Dict[str, dict]] = {}
    for method, by_set in all_scores.items():
        for name, s in by_set.items():
            if name != 'id':
                out.setdefault(name, {})[method] = bootstrap_ci(by_set['id'], s, n_boot, seed)
    return out


def fit_detectors(features: torch.Tensor, targets: torch.Tensor, classifier: nn.Module, knn_k: int = 50,
                  methods: Sequence[str] = ('react', 'knn', 'mahalanobis', 'vim')) -> Dict[str, Detector]:
    """The fitted baselines, sized to the fit set, with a warning wherever the fit set is too small for them.

    KNN's k-th neighbour must be able to come from the image's own class: with k at or above the smallest
    per-class count it comes from another class for every ID image of that class (k = 50 on 40 images per class
    inverted KNN's AUROC to 8.6%), so k is capped below that count. Mahalanobis with fewer images than feature
    dimensions, or a class of one image, and ViM with fewer images than its principal dimension are fitted but
    flagged (ViM's dimension is capped so it can still leave a residual).
    """
    n, d = features.shape
    counts = torch.bincount(targets[targets >= 0], minlength=classifier.weight.shape[0])
    smallest = int(counts[counts > 0].min()) if bool((counts > 0).any()) else n
    kwargs: Dict[str, dict] = {}
    if 'knn' in methods:
        k = knn_k
        if k >= smallest:
            k = max(1, smallest - 1)
            warnings.warn(f'KNN: k={knn_k} is not below the smallest class of the fit set ({smallest} images), so '
                          f'the k-th neighbour would come from another class; using k={k} (set --knn-k, or fit on '
                          'more images per class)', stacklevel=2)
        kwargs['knn'] = {'k': min(k, n)}
    if 'mahalanobis' in methods:
        if n <= d or smallest < 2:
            warnings.warn(f'Mahalanobis: {n} fit images for {d} feature dimensions (smallest class {smallest}); the '
                          'class means and the shared covariance are poorly estimated, so its scores are unreliable '
                          '(fit on more images)', stacklevel=2)
    if 'vim' in methods:
        dim = _scores._vim_dim(d)  # the ViM paper's rule, as ViM() uses it
        if n <= dim:
            capped = max(1, min(dim, n - 1, d - 1))
            warnings.warn(f'ViM: its principal subspace (dim {dim}) needs more than {dim} fit images, got {n}; '
                          f'using dim {capped}, and its scores are unreliable (fit on more images)', stacklevel=2)
            dim = capped
        kwargs['vim'] = {'dim': dim}
    fitted = {}
    for m in methods:
        try:
            fitted[m] = create_detector(m, **kwargs.get(m, {})).fit(features, targets, classifier)
        except _scores.NoResidualError as e:  # repeated images span fewer dimensions than their count
            if e.spanned < 2:
                raise
            dim = e.spanned - 1
            warnings.warn(f'ViM: the {n} fit images span {e.spanned} dimensions, no more than its principal '
                          f'subspace (dim {kwargs[m]["dim"]}); using dim {dim}, and its scores are unreliable (fit on '
                          'more, varied images)', stacklevel=2)
            fitted[m] = create_detector(m, dim=dim).fit(features, targets, classifier)
    return fitted


def write_scores_csv(all_scores: Mapping[str, Mapping[str, torch.Tensor]], paths: Mapping[str, Sequence],
                     path: Path, targets: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """One row per image: ``set, index, path, target, <one column per method>``; ``path`` is the image's file, or
    what ``paths`` gives for an image read from no file (``ssod eval``: its row in its data set, as
    ``FashionMNIST(test)[1234]``). Each score is written as the shortest text that reads back to the same number:
    ODIN's at T = 1000 differ in the 8th digit, and any rounding would tie them, so metrics recomputed from the file
    would not be the reported ones."""
    methods = list(all_scores)
    sets = list(next(iter(all_scores.values())))
    with open(path, 'w', newline='') as f:
        w = csv.writer(f, lineterminator='\n')
        w.writerow(['set', 'index', 'path', 'target', *methods])
        for name in sets:
            columns = [all_scores[m][name].tolist() for m in methods]
            files = list(paths.get(name) or [])
            target = (targets or {}).get(name)
            for i, row in enumerate(zip(*columns)):
                w.writerow([name, i, str(files[i]) if i < len(files) else '',
                            int(target[i]) if target is not None else '', *map(repr, row)])
    return path


# the row names of every results table; a baseline's is its key, with the model it scored (method_label)
LABELS = {'ssod_spatial_top3': 'SSOD model, mean MaxLogit of the 3 best positions (study\'s choice)',
          'ssod_spatial_energy': 'SSOD model, best-position energy',
          'ssod_spatial': 'SSOD best-position posterior: max_p logsumexp(z(p)) + log P_ID(p)',
          'ssod': 'SSOD OOD factor, Eq. 15 (paper)', 'ssod_posterior': 'SSOD pooled posterior: logsumexp(z) + log P_ID',
          'ssod_energy': 'Energy of the SSOD model', 'energy_spatial': 'best-position energy',
          'maxlogit_spatial_top3': 'mean MaxLogit of the 3 best positions'}


# the models of a results table by their key in ``results['id_accuracy']``: the SSOD model, and the baseline
# model when one was given, 'ce' if its OOD head was never trained (a cross-entropy classifier), else 'baseline'
MODELS = {'ssod': 'SSOD model', 'ce': 'CE model', 'baseline': 'baseline SSOD model'}


def baseline_of(id_accuracy: Mapping[str, float]) -> Optional[str]:
    """The baseline model's key in ``results['id_accuracy']`` (:data:`MODELS`); None when the baselines scored
    the SSOD model itself."""
    return next((k for k in id_accuracy if k != 'ssod'), None)


def method_label(method: str, baseline: Optional[str]) -> str:
    """The row name of ``method`` in every results table: an SSOD readout's description, or a baseline's, with
    the model it scored: ``baseline``'s (:data:`MODELS`), or the SSOD model itself when ``baseline`` is None."""
    label = LABELS.get(method, method)
    return label if method.startswith('ssod') else f'{label} ({MODELS[baseline] if baseline else "same model"})'


def deployed_thresholds(model: Any) -> Dict[str, Optional[float]]:
    """Method name (:data:`DEPLOYED`) -> the SSOD model's calibrated threshold for that readout, or None."""
    return {m: getattr(model, r.attribute, None) for m, r in DEPLOYED.items()}


def deployment_report(all_scores: Mapping[str, Mapping[str, torch.Tensor]], ood: Mapping[str, Mapping[str, dict]],
                      model: Any, n_boot: int, *, baseline: Optional[str],
                      note: str = '') -> Tuple[str, Dict[str, Any]]:
    """What a deployment decides with, as ``ssod eval`` and ``ssod demo`` report it: accept rates of each readout
    in :data:`DEPLOYED` at the SSOD ``model``'s calibrated threshold for it, and bootstrap intervals (seed 0; none
    when ``n_boot`` is 0). Returns the markdown section and the keys it adds to ``results.json``:
    ``accept_rates`` and ``thresholds`` by method, ``bootstrap`` and ``ci``. ``baseline``: the model the baselines
    scored (:func:`method_label`). ``note``: a caveat printed under the thresholds (and kept as
    ``thresholds_note``), e.g. that the images were scored at another size than the thresholds were set at."""
    ci = confidence_intervals(all_scores, n_boot) if n_boot else {}
    thresholds = {m: t for m, t in deployed_thresholds(model).items() if m in all_scores}
    rates = {m: accept_rates(all_scores[m], t) for m, t in thresholds.items()}
    keys = {'accept_rates': rates, 'thresholds': thresholds,
            'bootstrap': {'resamples': n_boot, 'seed': 0, 'level': 95}, 'ci': ci,
            **({'thresholds_note': note} if note else {})}
    return report_markdown(rates, thresholds, ci, ood, n_boot, baseline=baseline, note=note), keys


def report_markdown(accept: Mapping[str, Mapping[str, dict]], thresholds: Mapping[str, Optional[float]],
                    ci: Mapping[str, Mapping[str, dict]], ood: Mapping[str, Mapping[str, dict]], n_boot: int,
                    *, baseline: Optional[str], note: str = '') -> str:
    """Counts, accept rates at the model's thresholds, and FPR95 / AUROC with bootstrap intervals; methods are
    named as in the main table (:func:`method_label`), each with its key, its column in ``scores.csv``."""
    lines = ['## At the model\'s own thresholds', '']
    calibrated = [m for m, t in thresholds.items() if t is not None]
    missing = [DEPLOYED[m].attribute for m, t in thresholds.items() if t is None]
    sets = next(iter(accept.values()), {})
    if missing:
        lines += [f'The model has no calibrated `{"` or `".join(missing)}` (`ssod calibrate` sets '
                  f'{"them" if len(missing) > 1 else "it"} on ID validation images, except an `ood_threshold` for '
                  'a model whose OOD head was never trained), so no accept rates for '
                  f'{"those readouts" if len(missing) > 1 else "that readout"}.', '']
    if calibrated:
        lines += ['Kept: ' + '; '.join(f'`{DEPLOYED[m].score} >= {thresholds[m]:.6g}` (`model.{DEPLOYED[m].attribute}`)'
                                       for m in calibrated) +
                  '. ID should be near 95% if a threshold was calibrated on data like this. If it was calibrated on '
                  'these very ID images, ID is 95% by construction and each OOD row equals that readout\'s FPR95; '
                  'only on images it was not calibrated on are the OOD rows an estimate of what gets through in '
                  'deployment.', '', *([note, ''] if note else [])]
    lines += ['| Set | Images |' + ''.join(f' Accepted %, `{DEPLOYED[m].score}` |' for m in calibrated),
              '|---|---:|' + '---:|' * len(calibrated),
              *[f'| {k} | {v["n"]} |' + ''.join(f' {accept[m][k]["accepted"]:.1f} |' for m in calibrated)
                for k, v in sets.items()]]
    if not n_boot or not ci:
        why = '`--bootstrap 0`' if not n_boot else 'no OOD set was scored'
        return '\n'.join(lines + ['', f'No bootstrap intervals ({why}).'])
    lines += ['', f'## FPR95 and AUROC with 95% bootstrap intervals ({n_boot} resamples, seed 0)', '']
    sets = list(ci)
    lines += ['| Method | ' + ' | '.join(f'{s} FPR95 [95% CI] | {s} AUROC [95% CI]' for s in sets) + ' |',
              '|---|' + '---:|---:|' * len(sets)]
    for method in (ci[sets[0]] if sets else {}):
        cells = []
        for s in sets:
            r, c = ood[s][method], ci[s][method]
            cells += [f'{r["fpr95"]:.1f} [{c["fpr95"][0]:.1f}, {c["fpr95"][1]:.1f}]',
                      f'{r["auroc"]:.1f} [{c["auroc"][0]:.1f}, {c["auroc"][1]:.1f}]']
        lines.append(f'| {method_label(method, baseline)}, `{method}` | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Each interval is one method\'s alone. All methods are scored on the same images, so two '
              'overlapping intervals do not by themselves make two methods a tie: to rank a pair, bootstrap the '
              'difference of their metrics over the same resamples (the per-image scores are in `scores.csv`, one '
              'column per method, under the key its row ends with).']
    return '\n'.join(lines)
