"""SSOD's patch sampler and training objective (paper Sec. 2.3, Eq. 12-14; balance schemes of Table 5).

The classification head, applied at every feature-map position, labels each patch by its confidence on the
image's label: >= gamma is an ID patch (y_ood = 1), < 1 - gamma an OOD (background) patch (y_ood = 0), the rest
are ignored (Eq. 12). The OOD head is trained on those labels jointly with classification:
``L = CE(pooled logits, y) + alpha * L_ood`` (Eq. 14), where L_ood balances ID and OOD patches by one of

- ``'lwb'`` loss-wise balance (default, the paper's best): mean CE over ID patches and mean CE over OOD
  patches, computed separately, then averaged;
- ``'lw'`` loss weighting: one mean over all sampled patches, OOD (background) patches weighted by
  ``background_weight`` (1.0 = no weighting);
- ``'dr'`` data resampling: per image, an equal number of ID and OOD patches drawn at random, then one mean.

Beyond the paper, ``exposure`` > 0 also trains the *classification* head on the sampled OOD patches: at each
one, the cross-entropy of its class softmax against the uniform distribution (Outlier Exposure's loss, Hendrycks
et al. 2019, with the sampler's background patches as the outliers; no outlier data). The total is then
``CE + alpha * L_ood + exposure * L_exposure``, L_exposure a mean over the OOD patches (0 = the paper's objective).
Its value is at least log M, reached at a uniform softmax. With fewer classes than 1 / (1 - gamma) (20 at gamma
0.95) a uniform softmax puts 1/M on the label, above the OOD cutoff, so a patch it flattens leaves the OOD set: in
the study (10 classes) the sampler's OOD share fell from 24% to under 1%.

A batch with no ID patches, no OOD patches, or none at all gives a finite loss whose gradient is that of the
terms that exist (an empty term is exactly zero, still connected to the graph, so DDP sees every parameter).
"""
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import ID_INDEX
from .output import SpatialOutput

__all__ = ['sample_patches', 'ood_cutoff', 'SSODLoss', 'SSODLossParts', 'BALANCE_SCHEMES', 'OOD_RULES', 'IGNORE',
           'PATCH_MEANS']

BALANCE_SCHEMES = ('lwb', 'lw', 'dr')
IGNORE = -1  # patch label: neither confidently ID nor confidently OOD
OOD_INDEX = 1 - ID_INDEX


OOD_RULES = ('paper', 'chance')


def ood_cutoff(gamma: float, num_classes: int, rule: str = 'paper') -> float:
    """The confidence on its label below which a patch is taken as OOD (background).

    - ``'paper'``: 1 - gamma (Eq. 12).
    - ``'chance'``: max(1 - gamma, 0.5 / M), below half the uniform probability. Identical to the paper's rule
      for M >= 10 classes at gamma 0.95 (CIFAR-10, ImageNet); with few classes (M = 3: uniform 0.33) a
      background patch rarely puts under 5% on its own label, so the paper's rule yields almost no OOD patches.
    """
    if rule == 'paper':
        return 1.0 - gamma
    if rule == 'chance':
        return max(1.0 - gamma, 0.5 / num_classes)
    raise ValueError(f'rule must be one of {OOD_RULES}, got {rule!r}')


def _check_gamma(gamma: float) -> None:
    if not 0.5 < gamma <= 1.0:
        raise ValueError(f'gamma must be in (0.5, 1], got {gamma}: below 0.5 a patch could be both ID and OOD')


@torch.no_grad()
def sample_patches(cls_map: torch.Tensor, target: torch.Tensor, gamma: float = 0.95,
                   ood_rule: str = 'paper') -> torch.Tensor:
    """Self-supervised OOD labels for every feature-map position (Eq. 12).

    Args:
        cls_map: (B, M, H, W) class logits at each position.
        target: (B,) int64 image labels.
        gamma: confidence threshold in (0.5, 1].
        ood_rule: ``'paper'`` (OOD below 1 - gamma) or ``'chance'`` (below max(1 - gamma, 0.5 / M)); see
            :func:`ood_cutoff`.

    Returns:
        (B, H, W) int64: 1 (ID) where softmax confidence on the label >= gamma, 0 (OOD) where below the
        :func:`ood_cutoff`, -1 (ignored) otherwise, NaN confidences included. Computed without gradient.
    """
    _check_gamma(gamma)
    _check_target(target)
    if cls_map.ndim != 4 or target.shape != cls_map.shape[:1]:
        raise ValueError(f'expected cls_map (B, M, H, W) and target (B,), got {tuple(cls_map.shape)} and '
                         f'{tuple(target.shape)}')
    b, _, h, w = cls_map.shape
    index = target.view(b, 1, 1, 1).expand(b, 1, h, w)
    confidence = cls_map.float().softmax(dim=1).gather(1, index).squeeze(1)
    labels = torch.full_like(confidence, IGNORE, dtype=torch.int64)
    labels[confidence >= gamma] = ID_INDEX
    labels[confidence < ood_cutoff(gamma, cls_map.shape[1], ood_rule)] = OOD_INDEX
    return labels


def _check_target(target: torch.Tensor) -> None:
    """SSOD's labels are hard: (B,) int64 class indices. Soft targets, timm's Mixup/CutMix, say so first."""
    if target.is_floating_point() and target.ndim == 2:
        raise TypeError(f'SSOD samples patches with hard labels, (B,) int64 class indices; got soft targets of shape '
                        f'{tuple(target.shape)} (timm\'s Mixup/CutMix): mixup and cutmix are not supported, train '
                        'without them')
    if target.dtype != torch.int64:
        raise TypeError(f'SSOD samples patches with hard labels, (B,) int64 class indices; got {target.dtype}: '
                        'pass target.long()')


class SSODLossParts(NamedTuple):
    """The objective and its parts; all but ``loss`` are detached, for logging.

    Attributes:
        loss: () the total, CE + alpha * OOD loss (Eq. 14), + exposure * exposure_loss when that weight is set.
        cls_loss: () classification CE on the pooled logits.
        ood_loss_id: () mean OOD-head CE over ID patches (0 if there are none).
        ood_loss_ood: () mean OOD-head CE over OOD patches (0 if there are none).
        frac_id, frac_ood, frac_ignored: () fractions of all positions sampled as ID / OOD / ignored.
        exposure_loss: () mean CE of the class softmax against uniform over OOD patches (0 if there are none; at
            least log M otherwise); computed whatever ``exposure`` is, so a paper-faithful run logs how far its
            background is from uniform.
    """
    loss: torch.Tensor
    cls_loss: torch.Tensor
    ood_loss_id: torch.Tensor
    ood_loss_ood: torch.Tensor
    frac_id: torch.Tensor
    frac_ood: torch.Tensor
    frac_ignored: torch.Tensor
    exposure_loss: torch.Tensor


# the parts that are patch sums over the global patch counts (the rest are per-rank means)
PATCH_MEANS = ('ood_loss_id', 'ood_loss_ood', 'exposure_loss')


class SSODLoss(nn.Module):
    """CE(pooled logits, y) + alpha * balanced CE of the OOD head on sampled patches (Eq. 14), + ``exposure`` *
    Outlier Exposure on the OOD patches (beyond the paper; 0 by default).

    Args:
        gamma: sampler confidence threshold (Eq. 12), 0.95 in the paper.
        alpha: weight of the OOD loss (Eq. 14), 1.0 in the paper (Table 4).
        balance: 'lwb' (default), 'lw' or 'dr' (Table 5); see the module docstring.
        background_weight: weight of OOD patches under 'lw'.
        label_smoothing: for the classification CE.
        ood_rule: which patches are OOD: 'paper' (below 1 - gamma) or 'chance' (see :func:`ood_cutoff`).
        exposure: weight of the classifier's Outlier Exposure loss on the OOD patches (module docstring); 0, the
            default, is the paper's objective.
        count_reducer: sums a tensor of patch counts over data-parallel ranks (e.g. an all-reduce), so that
            per-patch means are over the global batch and a run on N ranks matches one process with the same
            global batch. ``world_size`` must then be the number of ranks (DDP averages gradients over them).
    """

    def __init__(
            self,
            gamma: float = 0.95,
            alpha: float = 1.0,
            balance: str = 'lwb',
            background_weight: float = 1.0,
            label_smoothing: float = 0.0,
            count_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            world_size: int = 1,
            ood_rule: str = 'paper',
            exposure: float = 0.0,
    ):
        super().__init__()
        if balance not in BALANCE_SCHEMES:
            raise ValueError(f'balance must be one of {BALANCE_SCHEMES}, got {balance!r}')
        _check_gamma(gamma)
        if not all(math.isfinite(v) and v >= 0 for v in (alpha, background_weight, exposure)):
            raise ValueError(f'alpha, background_weight and exposure must be finite and >= 0, got {alpha}, '
                             f'{background_weight} and {exposure}')
        self.gamma, self.alpha, self.balance = gamma, alpha, balance
        self.background_weight, self.label_smoothing = background_weight, label_smoothing
        if world_size > 1 and count_reducer is None:
            raise ValueError(f'world_size={world_size} needs a count_reducer that sums the patch counts over the '
                             'ranks (e.g. an all-reduce); without it each rank divides by its own counts and the '
                             'loss is mis-scaled by the number of ranks')
        if world_size < 1:
            raise ValueError(f'world_size must be >= 1, got {world_size}')
        self.count_reducer, self.world_size = count_reducer, world_size
        if ood_rule not in OOD_RULES:
            raise ValueError(f'ood_rule must be one of {OOD_RULES}, got {ood_rule!r}')
        self.ood_rule = ood_rule
        self.exposure = exposure

    def forward(self, out: SpatialOutput, target: torch.Tensor, ood: bool = True,
                generator: Optional[torch.Generator] = None) -> SSODLossParts:
        """Args:
            out: the model's ``forward_spatial`` output.
            target: (B,) int64 labels.
            ood: False trains classification only (warm-up epochs); the OOD head then gets zero gradient.
            generator: RNG for the 'dr' scheme's resampling.
        """
        if not isinstance(out, SpatialOutput):
            raise TypeError(f'SSODLoss takes the model\'s forward_spatial(x) output (the logits and the per-position '
                            f'maps it samples patches from), got {type(out).__name__}: call '
                            'loss(model.forward_spatial(x), target)')
        _check_target(target)
        cls_loss = F.cross_entropy(out.logits.float(), target, label_smoothing=self.label_smoothing)
        labels = sample_patches(out.cls_map.detach(), target, self.gamma, self.ood_rule)
        is_id, is_ood = labels == ID_INDEX, labels == OOD_INDEX
        n_total = labels.numel()
        fractions = [is_id.sum() / n_total, is_ood.sum() / n_total, (labels == IGNORE).sum() / n_total]

        # per-patch CE of the OOD head, (B, H, W); ignored patches are masked out below
        patch_ce = F.cross_entropy(out.ood_map.float(), labels.clamp(min=0), reduction='none')
        connect = out.ood_map.sum() * 0.0  # keeps the OOD head in the graph when no term exists
        if self.balance == 'dr':
            is_id, is_ood = _resample_equal(is_id, is_ood, generator)
        sum_id, sum_ood = (patch_ce * is_id).sum(), (patch_ce * is_ood).sum()
        # Outlier Exposure on the sampled background: CE of each OOD patch's class softmax against uniform. Its
        # patches are the sampler's, before 'dr' resamples them for the OOD head
        cls_map = out.cls_map.float()
        to_uniform = cls_map.logsumexp(1) - cls_map.mean(1)  # (B, H, W)
        is_bg = labels == OOD_INDEX
        sum_bg = (to_uniform * is_bg).sum()
        counts = torch.stack([is_id.sum(), is_ood.sum(), is_bg.sum()]).to(patch_ce.dtype)
        if self.count_reducer is not None:
            counts = self.count_reducer(counts.clone())
        n_id, n_ood, n_bg = counts[0], counts[1], counts[2]
        scale = float(self.world_size)
        loss_id = sum_id * scale / n_id.clamp(min=1)
        loss_ood = sum_ood * scale / n_ood.clamp(min=1)
        loss_bg = sum_bg * scale / n_bg.clamp(min=1)

        if self.balance == 'lwb':
            terms = (n_id > 0).to(patch_ce.dtype) + (n_ood > 0).to(patch_ce.dtype)
            ood_loss = (loss_id + loss_ood) / terms.clamp(min=1)
        elif self.balance == 'lw':
            w = self.background_weight
            ood_loss = (sum_id + w * sum_ood) * scale / (n_id + w * n_ood).clamp(min=1)
        else:  # 'dr': equal numbers of each per image, one mean
            ood_loss = (sum_id + sum_ood) * scale / (n_id + n_ood).clamp(min=1)

        ood_loss = ood_loss + connect
        loss = cls_loss + (self.alpha * ood_loss if ood else 0.0 * ood_loss)
        if self.exposure and ood:
            loss = loss + self.exposure * loss_bg
        return SSODLossParts(loss, cls_loss.detach(), loss_id.detach() / scale, loss_ood.detach() / scale,
                             *(f.detach() for f in fractions), loss_bg.detach() / scale)


def _resample_equal(is_id: torch.Tensor, is_ood: torch.Tensor, generator: Optional[torch.Generator]):
    """Per image, keep min(#ID, #OOD) patches of each kind, chosen uniformly at random."""
    b = is_id.shape[0]
    flat_id, flat_ood = is_id.reshape(b, -1), is_ood.reshape(b, -1)
    n = torch.minimum(flat_id.sum(1), flat_ood.sum(1)).unsqueeze(1)
    noise = torch.rand(flat_id.shape, generator=generator, device='cpu').to(is_id.device)

    def keep(mask: torch.Tensor) -> torch.Tensor:
        key = torch.where(mask, noise, torch.full_like(noise, 2.0))  # candidates first, in random order
        rank = key.argsort(dim=1).argsort(dim=1)
        return mask & (rank < n)

    return keep(flat_id).view_as(is_id), keep(flat_ood).view_as(is_ood)
