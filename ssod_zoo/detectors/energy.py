"""Energy: score = T * logsumexp(z / T) (the negative free energy).

Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
"""
import torch

from .. import scores
from ._base import Detector

__all__ = ['Energy']


class Energy(Detector):
    """Negative free energy of the logits at temperature T (the paper uses 1); nothing to fit."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = float(temperature)

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return scores.energy(logits, self.temperature)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(temperature={self.temperature})'
