"""MSP: score = max_i softmax(z)_i.

Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural Networks",
ICLR 2017.
"""
import torch

from .. import scores
from ._base import Detector

__all__ = ['MSP']


class MSP(Detector):
    """Maximum softmax probability of the logits; nothing to fit."""

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return scores.msp(logits)
