"""Data loading in the training process (--workers 0) leaves the training RNG alone."""
import random

import torch

from ssod_zoo.app.train import _SeededTransform


def test_seeded_transform_leaves_the_global_rngs_alone():
    def augment(x):
        return x + torch.rand(1).item() + random.random()

    ds = _SeededTransform([(0.0, 0), (1.0, 1)], augment, seed=3)
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(123)
    random.seed(123)
    first = [ds[i][0] for i in range(2)]
    assert (torch.rand(3).tolist(), [random.random() for _ in range(3)]) == (expected[0].tolist(), expected[1])
    assert [ds[i][0] for i in range(2)] == first  # still a pure function of (seed, epoch, index)
