"""ODIN: score = max_i softmax(f(x~) / T)_i, x~ = x - eps * sign(-grad_x log max_i softmax(f(x) / T)_i) / std.

Liang et al., "Enhancing The Reliability of Out-of-distribution Image Detection in Neural Networks", ICLR 2018.
"""
from typing import Callable, Optional, Sequence

import torch

from .. import scores
from ._base import Detector

__all__ = ['ODIN']


class ODIN(Detector):
    """Temperature scaling plus an input step: needs the images and the model (``score_images``), not features.
    ``epsilon`` is in units of pixel values in [0, 1] when ``score_images`` is given the images' normalisation
    ``std`` (the paper's code and OpenOOD's; ``ssod eval`` passes the model's), else in the units of the images
    (:func:`ssod_zoo.scores.odin`)."""
    needs_images = True

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014) -> None:
        self.temperature, self.epsilon = float(temperature), float(epsilon)

    def score_images(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                     std: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Args:
            logits_fn: images -> (B, M) logits, the model in eval mode.
            x: (B, C, H, W) normalised images.
            std: (C,) the std they were normalised with (``model.pretrained_cfg['std']``), or None.

        Returns:
            (B,) scores in (0, 1].
        """
        return scores.odin(logits_fn, x, self.temperature, self.epsilon, std)

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise TypeError('ODIN scores images (it takes an input-gradient step): call score_images(model, x)')

    def __repr__(self) -> str:
        return f'{type(self).__name__}(temperature={self.temperature}, epsilon={self.epsilon})'
