"""Tiny models and image folders for the command-line tests (test_predict.py, test_cli_*.py), and the Hub API
check of the tests' stand-ins for HfApi (test_hub.py, test_protocols.py)."""
import inspect
import os
from pathlib import Path

import huggingface_hub
import numpy as np
import timm
import torch
from PIL import Image

from ssod_zoo.hub import CHECKPOINT_FORMAT

NAMES = ('cat', 'dog', 'fox')
REPO_ROOT = Path(__file__).resolve().parent.parent
# a child's check that it imported this checkout's ssod_zoo, not a copy installed earlier (pip install .)
ASSERT_THIS_CHECKOUT = ("import os, pathlib, ssod_zoo; assert pathlib.Path(ssod_zoo.__file__).resolve()"
                        ".is_relative_to(os.environ['SSOD_ZOO_CHECKOUT']), ssod_zoo.__file__")


def child_env(*first, **env) -> dict:
    """``os.environ`` for a child Python that imports this checkout's ssod_zoo rather than an installed copy:
    ``PYTHONPATH`` is ``first``, the repository root, then the caller's own; ``SSOD_ZOO_CHECKOUT`` is the root, for
    :data:`ASSERT_THIS_CHECKOUT`; ``env`` is added last."""
    path = [str(p) for p in first] + [str(REPO_ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]
    return {**os.environ, 'PYTHONPATH': os.pathsep.join(path), 'SSOD_ZOO_CHECKOUT': str(REPO_ROOT), **env}


def bind_hfapi(method: str, *args, **kwargs) -> inspect.BoundArguments:
    """The call as the real ``huggingface_hub.HfApi`` would take it: a wrong or misspelt argument fails here."""
    bound = inspect.signature(getattr(huggingface_hub.HfApi, method)).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound


def make_checkpoint(path, threshold=None, size=64, num_classes=3, seed=0, spatial_threshold=None):
    """A ssod_test_resnet training checkpoint as `ssod train` writes it (untrained weights, 64 px)."""
    torch.manual_seed(seed)
    model = timm.create_model('ssod_test_resnet', num_classes=num_classes)
    torch.save({'format': CHECKPOINT_FORMAT, 'architecture': 'ssod_test_resnet',
                'model_args': {'num_classes': num_classes}, 'model': model.state_dict(),
                'ood_threshold': threshold, 'spatial_threshold': spatial_threshold,
                'class_names': list(NAMES[:num_classes]),
                'data_config': {'input_size': (3, size, size), 'crop_pct': 1.0, 'interpolation': 'bilinear',
                                'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}}, path)
    return path


# Images a decisive checkpoint is fitted to: one solid colour per class of NAMES, and two that are none of them.
# For each: the class logits and the OOD head's (ID - OOD) logit difference the fitted heads give it.
DECISIVE = {
    'cat.png': ((4.0, 0.0, 0.0), 4.0),
    'dog.png': ((0.0, 4.0, 0.0), 4.0),
    'fox.png': ((0.0, 0.0, 4.0), 4.0),
    'odd_a.png': ((1.0, 0.0, 0.0), -0.4),   # ood_factor 0.40: unknown by Eq. 7's argmax, kept above a threshold of 0.2
    'odd_b.png': ((0.0, 0.0, 2.0), -3.0),   # ood_factor 0.05: unknown by either rule
}


def _decisive_image(name, size=40):
    rng = np.random.default_rng(len(name))
    colours = {'cat.png': (200, 30, 30), 'dog.png': (30, 200, 30), 'fox.png': (30, 30, 200)}
    if name in colours:
        return Image.new('RGB', (size, size), colours[name])
    if name == 'odd_a.png':
        a = np.zeros((size, size, 3), np.uint8)
        a[::4] = 255  # stripes
        return Image.fromarray(a)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def make_decisive_checkpoint(path, folder, threshold=0.2):
    """A checkpoint whose two heads are fitted (least squares on the pooled features) to give the images of
    :data:`DECISIVE`, written to ``folder``, exactly the logits listed there: the classes and both rules' decisions
    of ``ssod predict`` can then be worked out by hand."""
    make_checkpoint(path, threshold=threshold, size=48)
    ckpt = torch.load(path, weights_only=False)
    model = timm.create_model('ssod_test_resnet', num_classes=len(NAMES))
    model.load_state_dict(ckpt['model'])
    model.eval()
    transform = timm.data.create_transform(**{**ckpt['data_config'], 'crop_mode': 'center'})
    folder.mkdir(parents=True, exist_ok=True)
    for name in DECISIVE:
        _decisive_image(name).save(folder / name)
    x = torch.stack([transform(Image.open(folder / name).convert('RGB')) for name in DECISIVE])
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True).double()
    a = torch.cat([pooled, torch.ones(len(pooled), 1, dtype=torch.float64)], dim=1)
    logits = torch.tensor([t[0] for t in DECISIVE.values()], dtype=torch.float64)
    diff = torch.tensor([t[1] for t in DECISIVE.values()], dtype=torch.float64)
    ood = torch.stack([-diff / 2, diff / 2], dim=1)  # (OOD, ID) logits whose difference is diff
    for head, target in ((model.get_classifier(), logits), (model.ood_head, ood)):
        w = torch.linalg.pinv(a) @ target  # exact: fewer images than features
        head.weight.data.copy_(w[:-1].T)
        head.bias.data.copy_(w[-1])
    ckpt['model'] = model.state_dict()
    torch.save(ckpt, path)
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
