"""What an SSOD model returns, and the robust posterior built from it (paper Eq. 6-7)."""
from typing import NamedTuple, Optional

import torch

SPATIAL_K = 3  # positions the spatial readout averages (the study's choice); every spatial_threshold assumes it

__all__ = ['posterior_score', 'spatial_posterior_score', 'spatial_maxlogit_score', 'SSODOutput', 'SSODScores',
           'SpatialOutput',
           'robust_posterior']


class SSODOutput(NamedTuple):
    """The two factors of SSOD's posterior (paper Eq. 7).

    Unpacks like a tuple: ``logits, p_id = model(x)``.

    Attributes:
        logits: (B, M) class logits, exactly what the plain timm model gives; their softmax is the
            ID factor P(w_i | x in S_ID, x).
        ood_factor: (B,) in [0, 1], the OOD factor P(x in S_ID | x) (Eq. 15). Higher = more in-distribution.
    """
    logits: torch.Tensor
    ood_factor: torch.Tensor

    def __getattr__(self, name: str):
        # only for names a tuple lacks: code written for a tensor output (timm's train.py calls
        # output.log_softmax, validate.py hands it to the loss) learns what it got and what to do
        if name.startswith('__') or not hasattr(torch.Tensor, name):
            raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')
        raise AttributeError(
            f"SSODOutput (logits, ood_factor) has no tensor method {name!r}: the SSOD model's forward returns both "
            "outputs; use output.logits, or create the model with return_ood=False (timm's scripts: "
            "--model-kwargs return_ood=False) for the plain logits tensor")


class SSODScores(NamedTuple):
    """Everything a deployment decides with, from one forward pass (``model.forward_scores(x)``).

    Attributes:
        logits: (B, M) class logits, as in :class:`SSODOutput`.
        ood_factor: (B,) in [0, 1], the OOD factor of Eq. 15; keep where ``>= model.ood_threshold``.
        spatial_score: (B,) the mean MaxLogit of the 3 best feature-map positions (:func:`spatial_maxlogit_score`),
            the readout this project's study found to detect best; keep where ``>= model.spatial_threshold``.
    """
    logits: torch.Tensor
    ood_factor: torch.Tensor
    spatial_score: torch.Tensor


class SpatialOutput(NamedTuple):
    """Everything the SSOD objective needs from one forward pass (paper Eq. 11-13).

    Attributes:
        features: (B, C, H, W) the backbone's feature map X = h(x).
        logits: (B, M) pooled class logits f_cls(GAP(X)) (Eq. 11), identical to the plain timm model.
        ood_logits: (B, 2) the OOD head on pooled features; index 1 is "in-distribution".
        cls_map: (B, M, H, W) the classification head applied at every position of X.
        ood_map: (B, 2, H, W) the OOD head applied at every position of X (Eq. 13).
    """
    features: torch.Tensor
    logits: torch.Tensor
    ood_logits: torch.Tensor
    cls_map: torch.Tensor
    ood_map: torch.Tensor


def _check_factors(logits: torch.Tensor, ood_factor: torch.Tensor) -> None:
    """Eq. 7's two factors: (B, M) logits and a (B,) probability (NaN passes: a never-trained head's factor)."""
    if logits.ndim != 2 or ood_factor.shape != logits.shape[:1]:
        raise ValueError(
            f'expected logits (B, M) and ood_factor (B,), got {tuple(logits.shape)} and {tuple(ood_factor.shape)}')
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # no branch on values inside a graph
        return
    outside = (ood_factor < 0) | (ood_factor > 1)
    if bool(outside.any()):
        bad = ood_factor[outside]
        raise ValueError(f'ood_factor must be P(x in S_ID | x), in [0, 1] (model(x).ood_factor); got values from '
                         f'{bad.min().item():.4g} to {bad.max().item():.4g}: a score such as spatial_score is not a '
                         'probability')


def robust_posterior(logits: torch.Tensor, ood_factor: torch.Tensor) -> torch.Tensor:
    """The paper's posterior over M known classes plus "unknown" (Eq. 7).

    P(w_i | x) = softmax(logits)_i * P(x in S_ID | x), and P(w_{M+1} | x) = 1 - P(x in S_ID | x).

    Args:
        logits: (B, M) class logits.
        ood_factor: (B,) in [0, 1], P(x in S_ID | x).

    Returns:
        (B, M + 1) probabilities; each row sums to 1, the last column is the probability of "unknown".
    """
    _check_factors(logits, ood_factor)
    p_id = ood_factor.to(logits.dtype).unsqueeze(1)
    return torch.cat([logits.softmax(dim=1) * p_id, 1 - p_id], dim=1)


def posterior_score(logits: torch.Tensor, ood_factor: torch.Tensor, kind: str = 'energy') -> torch.Tensor:
    """A full-posterior OOD score: both factors of Eq. 7, the ID factor (the classifier) and the OOD factor.

    Higher = more in-distribution (the convention of :mod:`ssod_zoo.metrics`). Not in the paper, which scores with
    the OOD factor alone (Eq. 15); it is the natural detector once the posterior is factored as in Eq. 7.

    - ``kind='energy'``: log sum_i exp(z_i) + log P(x in S_ID | x). The negative free energy (Liu et al., NeurIPS
      2020) is the classifier's log-density proxy; adding log P_ID multiplies it by the OOD factor.
    - ``kind='msp'``: max_i softmax(z)_i * P(x in S_ID | x), the largest known-class probability of the Eq. 7
      posterior (:func:`robust_posterior`).

    Args:
        logits: (B, M) class logits z.
        ood_factor: (B,) in [0, 1], P(x in S_ID | x).
        kind: ``'energy'`` or ``'msp'``.

    Returns:
        (B,) float32 scores.
    """
    _check_factors(logits, ood_factor)
    z, p_id = logits.float(), ood_factor.float()
    if kind == 'energy':
        # P_ID saturates to 0 in float32 far from the data; the floor keeps the score finite and ordered by energy
        return torch.logsumexp(z, dim=1) + p_id.clamp_min(1e-30).log()
    if kind == 'msp':
        return z.softmax(dim=1).amax(dim=1) * p_id
    raise ValueError(f"kind is 'energy' or 'msp', got {kind!r}")


def spatial_posterior_score(cls_map: torch.Tensor, ood_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full posterior read out where the object is: the best feature-map position's score.

    score(x) = max_p [ log sum_i exp(z_i(p)) + log P(ID | p) ], with z(p) the classification head and P(ID | p)
    the OOD head at position p (the heads SSOD trains per position, Eq. 13). Objects often cover a minority of
    the image; pooling first (Eq. 15) mixes their evidence with the background's, the best position keeps it.
    Not in the paper; chosen on OOD validation sets by this project's study (``benchmarks/study.py``).
    Without ``ood_map`` it is the best position's Energy, a post-hoc readout any CNN has (the fair baseline).

    Args:
        cls_map: (B, M, h, w) class logits at every position (``SpatialOutput.cls_map``).
        ood_map: (B, 2, h, w) OOD-head logits at every position (``SpatialOutput.ood_map``), or None.

    Returns:
        (B,) float32 scores, higher = more in-distribution.
    """
    if cls_map.ndim != 4 or (ood_map is not None and (ood_map.ndim != 4 or ood_map.shape[0] != cls_map.shape[0])):
        raise ValueError(f'expected cls_map (B, M, h, w) and ood_map (B, 2, h, w), got {tuple(cls_map.shape)} and '
                         f'{None if ood_map is None else tuple(ood_map.shape)}')
    score = cls_map.float().logsumexp(dim=1)
    if ood_map is not None:
        score = score + ood_map.float().log_softmax(dim=1)[:, 1]  # index 1: in-distribution (adapter.ID_INDEX)
    return score.flatten(1).amax(dim=1)


def spatial_maxlogit_score(cls_map: torch.Tensor, k: int = SPATIAL_K) -> torch.Tensor:
    """The classifier read out where the objects are: the mean of the ``k`` largest per-position MaxLogits.

    score(x) = mean of the top ``k`` over positions p of max_i z_i(p), with z(p) the classification head at p
    (Eq. 13). A classifier-only readout (no OOD head), so any CNN has it; averaging a few positions steadies the
    best-position score when an object spans several cells. Not in the paper; chosen (config and readout together)
    on OOD validation sets by this project's study (``benchmarks/study.py``, ``k = 3``).

    Args:
        cls_map: (B, M, h, w) class logits at every position (``SpatialOutput.cls_map``).
        k: how many positions to average; capped at h * w.

    Returns:
        (B,) float32 scores, higher = more in-distribution.
    """
    if cls_map.ndim != 4:
        raise ValueError(f'expected cls_map (B, M, h, w), got {tuple(cls_map.shape)}')
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}')
    best = cls_map.float().amax(dim=1).flatten(1)  # (B, h*w): MaxLogit of each position
    return best.topk(min(k, best.shape[1]), dim=1).values.mean(dim=1)
