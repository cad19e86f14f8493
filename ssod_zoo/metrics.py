"""OOD detection metrics: FPR95, AUROC, AUPR-IN, AUPR-OUT, and ID accuracy.

The convention, used by every score and metric in ssod_zoo:

- A score is **higher = more in-distribution** (MSP, energy, SSOD's OOD factor, ...).
- **In-distribution is the positive class.** An image is accepted as ID when ``score >= t``.
- **FPR95** follows the SSOD paper and ODIN/Energy: the fraction of OOD images accepted at the threshold that
  accepts 95% of ID images. Lower is better.
- **AUROC**: the probability that a random ID image scores above a random OOD image, ties counting 1/2.
- **AUPR-IN**: average precision with ID positive on the scores; **AUPR-OUT**: average precision with OOD
  positive on the negated scores.

OpenOOD v1.5 and pytorch-ood use the reverse convention (OOD positive, "higher = more OOD"): their FPR95 is the
fraction of *ID* images flagged when 95% of OOD images are caught. That is a different number; do not put it in
the same table as this one. AUROC agrees between the two conventions.

Ties are handled exactly. The ROC has one operating point per distinct score (tied images are accepted or
rejected together), plus the origin; FPR95 is the FPR at the first operating point whose TPR >= 0.95, which is
``fpr[np.searchsorted(tpr, 0.95)]`` on scikit-learn's ``roc_curve(..., drop_intermediate=False)``. AUROC is the
trapezoidal area under that curve, which counts ties as 1/2 and equals ``roc_auc_score``; both AUPRs equal
``average_precision_score``. All arithmetic is float64, on the input's device.

Every function returns fractions in [0, 1]; multiply by 100 for a paper's table.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch

__all__ = ['OODMetrics', 'accuracy', 'aupr_in', 'aupr_out', 'auroc', 'fpr95_ood_positive', 'fpr_at_tpr',
           'ood_metrics', 'roc_curve']

ScoresLike = Union[torch.Tensor, Sequence[float]]


def fpr_at_tpr(id_scores: ScoresLike, ood_scores: ScoresLike, tpr: float = 0.95) -> float:
    """Fraction of OOD images accepted at the threshold that accepts ``tpr`` of the ID images (FPR95 by default).

    Args:
        id_scores: (N_id,) scores of in-distribution images, higher = more in-distribution.
        ood_scores: (N_ood,) scores of OOD images.
        tpr: the fraction of ID images to accept, in (0, 1].

    Returns:
        The FPR in [0, 1] at the first operating point (highest threshold) whose TPR >= ``tpr``.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f'tpr must be in (0, 1], got {tpr}; FPR95 is tpr=0.95')
    return _fpr_at_tpr(*_roc(*_check_pair(id_scores, ood_scores)), tpr)


def fpr95_ood_positive(id_scores: ScoresLike, ood_scores: ScoresLike, tpr: float = 0.95) -> float:
    """OpenOOD v1.5's FPR95 (OOD positive): the fraction of ID images rejected at the threshold that rejects
    ``tpr`` of the OOD images. Not this module's convention: use it only to sit next to OpenOOD's leaderboard.

    OpenOOD computes ``fpr[argmax(tpr >= 0.95)]`` on ``sklearn.metrics.roc_curve(is_ood, -score)``; this is the
    same ROC point with ties handled exactly (:func:`fpr_at_tpr` with the roles of ID and OOD swapped).

    Args:
        id_scores: (N_id,) scores of in-distribution images, higher = more in-distribution.
        ood_scores: (N_ood,) scores of OOD images.
        tpr: the fraction of OOD images to reject, in (0, 1].

    Returns:
        The fraction of ID images rejected, in [0, 1].
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f'tpr must be in (0, 1], got {tpr}; FPR95 is tpr=0.95')
    pos, neg = _check_pair(id_scores, ood_scores)
    return _fpr_at_tpr(*_roc(-neg, -pos), tpr)


def auroc(id_scores: ScoresLike, ood_scores: ScoresLike) -> float:
    """Area under the ROC curve, ID positive; P(score_id > score_ood) + P(score_id == score_ood) / 2.

    Args:
        id_scores: (N_id,) scores of in-distribution images, higher = more in-distribution.
        ood_scores: (N_ood,) scores of OOD images.

    Returns:
        AUROC in [0, 1]; 0.5 when the scores carry no information (e.g. all equal).
    """
    return _auroc(*_roc(*_check_pair(id_scores, ood_scores)))


def aupr_in(id_scores: ScoresLike, ood_scores: ScoresLike) -> float:
    """Average precision with ID as the positive class on the scores (scikit-learn's ``average_precision_score``).

    Args:
        id_scores: (N_id,) scores of in-distribution images, higher = more in-distribution.
        ood_scores: (N_ood,) scores of OOD images.

    Returns:
        AUPR-IN in [0, 1]; equals N_id / (N_id + N_ood) when all scores are equal.
    """
    pos, neg = _check_pair(id_scores, ood_scores)
    return _average_precision(pos, neg)


def aupr_out(id_scores: ScoresLike, ood_scores: ScoresLike) -> float:
    """Average precision with OOD as the positive class on the negated scores.

    Args:
        id_scores: (N_id,) scores of in-distribution images, higher = more in-distribution.
        ood_scores: (N_ood,) scores of OOD images.

    Returns:
        AUPR-OUT in [0, 1]; equals N_ood / (N_id + N_ood) when all scores are equal.
    """
    pos, neg = _check_pair(id_scores, ood_scores)
    return _average_precision(-neg, -pos)


def ood_metrics(id_scores: ScoresLike, ood_scores: ScoresLike) -> Dict[str, float]:
    """All four OOD metrics at once.

    Args:
        id_scores: (N_id,) scores of in-distribution images, higher = more in-distribution.
        ood_scores: (N_ood,) scores of OOD images.

    Returns:
        ``{'fpr95', 'auroc', 'aupr_in', 'aupr_out'}``, each a fraction in [0, 1].
    """
    pos, neg = _check_pair(id_scores, ood_scores)
    fpr, tpr = _roc(pos, neg)
    return {
        'fpr95': _fpr_at_tpr(fpr, tpr, 0.95),
        'auroc': _auroc(fpr, tpr),
        'aupr_in': _average_precision(pos, neg),
        'aupr_out': _average_precision(-neg, -pos),
    }


def roc_curve(id_scores: ScoresLike, ood_scores: ScoresLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ROC behind :func:`auroc` and :func:`fpr_at_tpr`, for plotting.

    Returns:
        ``(fpr, tpr)``, each (T + 1,) float64: the origin, then one point per distinct score, highest first.
    """
    pos, neg = _check_pair(id_scores, ood_scores)
    return _roc(pos, neg)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of the ID classifier.

    Args:
        logits: (B, M) class logits (or probabilities; only the argmax matters).
        targets: (B,) integer class indices.

    Returns:
        The fraction of rows whose argmax equals the target, in [0, 1].
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f'accuracy() expects tensors, got {type(logits).__name__} and {type(targets).__name__}')
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f'targets must be integer class indices, got {targets.dtype}; '
                        'for one-hot or soft targets pass targets.argmax(1)')
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        hint = '; for one-hot targets pass targets.argmax(1)' if targets.ndim == 2 else ''
        raise ValueError(f'accuracy() expects logits (B, M) and targets (B,), got {tuple(logits.shape)} and '
                         f'{tuple(targets.shape)}{hint}')
    if targets.numel() == 0:
        raise ValueError('accuracy() got an empty batch; pass at least one image')
    correct = logits.argmax(dim=1) == targets.to(logits.device)
    return float(correct.double().mean())


class OODMetrics:
    """Streaming FPR95 / AUROC / AUPR-IN / AUPR-OUT: feed batches, read the metrics at the end.

    The metrics need every score (a threshold at the 5th ID percentile is not decomposable), so this keeps
    one float64 per image, on the device the scores came from, detached.

    Example:
        >>> m = OODMetrics()
        >>> m.update(energy(model(x_id)), is_id=True)
        >>> m.update(energy(model(x_ood)), is_id=False)
        >>> m.compute()
        {'fpr95': ..., 'auroc': ..., 'aupr_in': ..., 'aupr_out': ...}
    """

    def __init__(self) -> None:
        self._id: List[torch.Tensor] = []
        self._ood: List[torch.Tensor] = []

    def update(self, scores: ScoresLike, is_id: Union[bool, torch.Tensor]) -> None:
        """Add a batch of scores.

        Args:
            scores: (B,) scores, higher = more in-distribution.
            is_id: a bool for the whole batch, or a (B,) bool tensor marking the ID images.
        """
        scores = _as_scores(scores, 'scores', allow_empty=True)
        if isinstance(is_id, bool):
            mask = torch.full_like(scores, is_id, dtype=torch.bool)
        else:
            mask = torch.as_tensor(is_id)
            if mask.dtype != torch.bool:
                raise TypeError(f'is_id must be a bool or a bool tensor, got {mask.dtype}; '
                                'pass labels == id_label (not class labels) or is_id.bool()')
            mask = mask.to(scores.device)
            if mask.ndim == 0:
                mask = mask.expand(scores.shape)
            elif mask.shape != scores.shape:
                raise ValueError(f'is_id has shape {tuple(mask.shape)} but scores have shape {tuple(scores.shape)}; '
                                 'pass one flag per score or a single bool for the batch')
        self._id.append(scores[mask])
        self._ood.append(scores[~mask])

    def compute(self) -> Dict[str, float]:
        """The metrics over everything seen since the last :meth:`reset`.

        Returns:
            ``{'fpr95', 'auroc', 'aupr_in', 'aupr_out'}``, each a fraction in [0, 1].
        """
        n_id = sum(t.numel() for t in self._id)
        n_ood = sum(t.numel() for t in self._ood)
        if n_id == 0 or n_ood == 0:
            raise ValueError(f'OODMetrics has seen {n_id} ID and {n_ood} OOD scores; the metrics need both: call '
                             'update(scores, is_id=True) for ID images and update(scores, is_id=False) for OOD ones')
        device = (self._id + self._ood)[0].device
        return ood_metrics(torch.cat([t.to(device) for t in self._id]),
                           torch.cat([t.to(device) for t in self._ood]))

    def reset(self) -> None:
        """Forget every score seen so far."""
        self._id.clear()
        self._ood.clear()

    def __repr__(self) -> str:
        n_id = sum(t.numel() for t in self._id)
        n_ood = sum(t.numel() for t in self._ood)
        return f'{type(self).__name__}(n_id={n_id}, n_ood={n_ood})'


def _as_scores(scores: ScoresLike, name: str, allow_empty: bool = False) -> torch.Tensor:
    """A detached (N,) float64 tensor of finite scores, or a ValueError that says what is wrong."""
    if isinstance(scores, torch.Tensor):
        t = scores.detach()
        if t.is_complex():
            raise TypeError(f'{name} must be real numbers, got {t.dtype}')
    else:
        t = torch.as_tensor(scores, dtype=torch.float64)  # not the float32 default: keep a list's precision
    if t.ndim != 1:
        raise ValueError(f'{name} must be a (N,) tensor of one score per image, got shape {tuple(t.shape)}; '
                         'reduce logits to a score first, e.g. scores.energy(logits)')
    if t.numel() == 0 and not allow_empty:
        raise ValueError(f'{name} is empty; the metrics need at least one ID and one OOD score')
    t = t.to(torch.float64)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f'{name} has {bad} NaN/Inf value(s) out of {t.numel()}; a score overflowed or the model '
                         'diverged. Compute scores in float32 (e.g. energy(logits.float())) or check the model '
                         'on those images; metrics on non-finite scores would be meaningless')
    return t


def _check_pair(id_scores: ScoresLike, ood_scores: ScoresLike) -> Tuple[torch.Tensor, torch.Tensor]:
    pos = _as_scores(id_scores, 'id_scores')
    neg = _as_scores(ood_scores, 'ood_scores')
    return pos, neg.to(pos.device)


def _cumulative_counts(pos: torch.Tensor, neg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """True and false positives accepted at each distinct threshold, highest threshold first.

    Returns:
        ``(tps, fps)``, each (T,) float64 for the T distinct scores; the last entry accepts everything.
    """
    scores = torch.cat([pos, neg])
    labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    scores, order = torch.sort(scores, descending=True)
    labels = labels[order]
    # accept score >= t: a threshold takes its whole tie group, so cut only after the last member of each group
    last = torch.nonzero(scores[1:] != scores[:-1]).squeeze(1)
    idx = torch.cat([last, last.new_tensor([scores.numel() - 1])])
    tps = labels.cumsum(0)[idx]
    fps = (idx + 1).to(torch.float64) - tps
    return tps, fps


def _with_origin(curve: torch.Tensor) -> torch.Tensor:
    return torch.cat([curve.new_zeros(1), curve])


def _roc(pos: torch.Tensor, neg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(FPR, TPR) at the origin and at every distinct threshold, highest first: each (T + 1,)."""
    tps, fps = _cumulative_counts(pos, neg)
    return _with_origin(fps / neg.numel()), _with_origin(tps / pos.numel())


def _fpr_at_tpr(fpr: torch.Tensor, tpr: torch.Tensor, target: float) -> float:
    # the curve ends at TPR = 1 >= target, so the index is always inside it
    i = torch.searchsorted(tpr, tpr.new_tensor([target]), side='left')
    return float(fpr[i])


def _auroc(fpr: torch.Tensor, tpr: torch.Tensor) -> float:
    return float(torch.trapezoid(tpr, fpr))


def _average_precision(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """sum_t (R_t - R_{t-1}) * P_t over distinct thresholds, ``pos`` being the positive class."""
    tps, fps = _cumulative_counts(pos, neg)
    precision = tps / (tps + fps)
    recall = _with_origin(tps / pos.numel())
    return float((recall.diff() * precision).sum())
