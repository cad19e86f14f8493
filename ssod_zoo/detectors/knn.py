"""KNN: score = -|| z - z_(k) ||_2, z = h / ||h|| and z_(k) the k-th nearest normalised ID training feature.

Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
"""
from typing import Optional

import torch
from torch import nn

from .. import scores
from ._base import Detector

__all__ = ['KNN']


class KNN(Detector):
    """Distance to the k-th nearest ID training feature on the unit sphere (k = 50 on CIFAR, 1000 on ImageNet)."""
    needs_fit = True

    def __init__(self, k: int = 50, chunk_size: int = 4096) -> None:
        self._knn = scores.KNN(k, chunk_size)

    @property
    def k(self) -> int:
        """Which neighbour's distance scores an image."""
        return self._knn.k

    def fit(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None,
            classifier: Optional[nn.Module] = None) -> 'KNN':
        self._knn.fit(features)
        return self

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._knn(features)

    def __repr__(self) -> str:
        return repr(self._knn)
