"""MaxLogit: score = max_i z_i.

Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
"""
import torch

from .. import scores
from ._base import Detector

__all__ = ['MaxLogit']


class MaxLogit(Detector):
    """The largest logit; nothing to fit."""

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return scores.max_logit(logits)
