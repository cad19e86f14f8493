"""The one interface every post-hoc OOD detector has (pytorch-ood's ``Detector`` is the model).

``fit`` sees the ID training features, their labels and the classifier, and takes what it needs (most take
nothing); ``score`` turns pooled features and logits into one score per image, **higher = more
in-distribution** (the convention of :mod:`ssod_zoo.metrics`). Callers look a detector up in
:data:`ssod_zoo.detectors.DETECTORS` and never branch on its name.
"""
from typing import Optional

import torch
from torch import nn

__all__ = ['Detector']


class Detector:
    """Base class: ``fit(features, labels, classifier)`` then ``score(features, logits)``.

    Attributes:
        needs_fit: whether ``fit`` must see ID training data before ``score`` (KNN, Mahalanobis, ViM, ReAct).
        needs_images: whether the detector scores images rather than features (ODIN: :meth:`score_images`).
    """
    needs_fit: bool = False
    needs_images: bool = False

    def fit(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None,
            classifier: Optional[nn.Module] = None) -> 'Detector':
        """Fit on in-distribution training data; detectors that need nothing return ``self`` unchanged.

        Args:
            features: (N, D) pooled pre-logits features of ID training images.
            labels: (N,) their integer labels.
            classifier: the model's classifier (``model.get_classifier()``), an ``nn.Linear`` (bias optional).
        """
        return self

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Args:
            features: (B, D) pooled pre-logits features.
            logits: (B, M) class logits of the same images.

        Returns:
            (B,) scores, higher = more in-distribution.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


def classifier_parameters(classifier: Optional[nn.Module], name: str):
    """(weight (M, D), bias (M,) or None) of a linear classifier, detached, float32 on CPU."""
    weight = getattr(classifier, 'weight', None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f'{name} needs the model\'s linear classifier (model.get_classifier()), got '
                         f'{type(classifier).__name__}')
    bias = getattr(classifier, 'bias', None)  # a classifier without a bias (bias=False) is fine
    return weight.detach().float().cpu(), None if bias is None else bias.detach().float().cpu()
