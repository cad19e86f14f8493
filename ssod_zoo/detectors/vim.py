"""ViM: score = logsumexp(z) - alpha * ||(h - u)^{P-perp}||, u = -W^+ b, P the principal subspace of the ID
features centred on u, alpha = mean max logit / mean residual norm on the fit set (the virtual logit).

Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
"""
from typing import Optional

import torch
from torch import nn

from .. import scores
from ._base import Detector, classifier_parameters

__all__ = ['ViM']


class ViM(Detector):
    """Energy minus the scaled norm of the feature's residual off the principal subspace."""
    needs_fit = True

    def __init__(self, dim: Optional[int] = None, chunk_size: int = 4096) -> None:
        self._vim = scores.ViM(dim, chunk_size)

    def fit(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None,
            classifier: Optional[nn.Module] = None) -> 'ViM':
        self._vim.fit(features, *classifier_parameters(classifier, 'ViM'))
        return self

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._vim(features, logits)

    def __repr__(self) -> str:
        return repr(self._vim)
