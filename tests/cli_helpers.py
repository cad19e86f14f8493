"""Tiny models and image folders for the command-line tests (test_predict.py, test_cli_*.py)."""
import numpy as np
import timm
import torch
from PIL import Image

from ssod_zoo.hub import CHECKPOINT_FORMAT

NAMES = ('cat', 'dog', 'fox')


def make_checkpoint(path, threshold=None, size=64, num_classes=3, seed=0):
    """A ssod_test_resnet training checkpoint as `ssod train` writes it (untrained weights, 64 px)."""
    torch.manual_seed(seed)
    model = timm.create_model('ssod_test_resnet', num_classes=num_classes)
    torch.save({'format': CHECKPOINT_FORMAT, 'architecture': 'ssod_test_resnet',
                'model_args': {'num_classes': num_classes}, 'model': model.state_dict(),
                'ood_threshold': threshold, 'class_names': list(NAMES[:num_classes]),
                'data_config': {'input_size': (3, size, size), 'crop_pct': 1.0, 'interpolation': 'bilinear',
                                'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}}, path)
    return path


def save_images(folder, n, seed=0, size=24):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + i % 3, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return folder


def class_tree(root, per_class, seed=0):
    """root/<class>/<i>.png for the three NAMES."""
    for k, name in enumerate(NAMES):
        save_images(root / name, per_class, seed=seed + k)
    return root
