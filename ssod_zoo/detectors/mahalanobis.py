"""Mahalanobis: score = -min_c (h - mu_c)^T Sigma^+ (h - mu_c), class means mu_c and one shared covariance Sigma.

Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
NeurIPS 2018 (without input preprocessing and feature ensemble).
"""
from typing import Optional

import torch
from torch import nn

from .. import scores
from ._base import Detector

__all__ = ['Mahalanobis']


class Mahalanobis(Detector):
    """Squared Mahalanobis distance to the closest class mean of the ID training features."""
    needs_fit = True

    def __init__(self, chunk_size: int = 4096) -> None:
        self._maha = scores.Mahalanobis(chunk_size)

    def fit(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None,
            classifier: Optional[nn.Module] = None) -> 'Mahalanobis':
        if labels is None:
            raise ValueError('Mahalanobis needs the labels of the ID training features (class means)')
        self._maha.fit(features, labels)
        return self

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._maha(features)

    def __repr__(self) -> str:
        return repr(self._maha)
