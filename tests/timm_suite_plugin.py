"""pytest plugin for running timm's own ``tests/test_models.py`` against the ssod_* models.

timm's suite expects ``model(x)`` to return a tensor, so every ssod_* entrypoint is created in
``return_ood=False`` mode (plain logits; the OOD factor stays reachable through ``forward_ssod``).
Used by tests/test_timm_suite.py: ``pytest <timm sdist>/tests/test_models.py -p timm_suite_plugin -k ssod_``.
"""
import functools

import timm
import ssod_zoo  # noqa: F401  (registers the models even where the autoload .pth is absent)
from timm.models import _registry


def pytest_configure(config):
    for name in timm.list_models('ssod_*'):
        entrypoint = _registry._model_entrypoints[name]
        _registry._model_entrypoints[name] = functools.wraps(entrypoint)(
            functools.partial(entrypoint, return_ood=False))
