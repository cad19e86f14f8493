"""ReAct: score = logsumexp(W min(h, c) + b), c the p-th percentile of the ID training activations (p = 90).

Sun et al., "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.
"""
from typing import Optional

import torch
from torch import nn

from .. import scores
from ._base import Detector, classifier_parameters

__all__ = ['ReAct']


class ReAct(Detector):
    """Energy of the classifier on features clipped at c (the percentile fitted on ID activations)."""
    needs_fit = True

    def __init__(self, percentile: float = 90.0) -> None:
        self._react = scores.ReAct(percentile)
        self._classifier = None

    @property
    def c(self) -> Optional[float]:
        return self._react.c

    def fit(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None,
            classifier: Optional[nn.Module] = None) -> 'ReAct':
        self._classifier = classifier_parameters(classifier, 'ReAct')
        self._react.fit(features)
        return self

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self._classifier is None:
            raise RuntimeError('ReAct is not fitted: call fit(features, labels, classifier) first')
        return self._react(features, *self._classifier)

    def __repr__(self) -> str:
        return repr(self._react)
