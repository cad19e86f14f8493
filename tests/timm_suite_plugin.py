"""pytest plugin for running timm's own ``tests/test_models.py`` against the ssod_* models.

timm's suite expects ``model(x)`` to return a tensor, so every ssod_* entrypoint is created in
``return_ood=False`` mode (plain logits; the OOD factor stays reachable through ``forward_ssod``).
Used by tests/test_timm_integration.py: ``pytest <timm sdist>/tests/test_models.py -p timm_suite_plugin -k ssod_``.
"""
import functools
import os
from pathlib import Path

import timm
import ssod_zoo  # noqa: F401  (registers the models even where the autoload .pth is absent)
from timm.models import _registry

if os.environ.get('SSOD_ZOO_CHECKOUT'):  # the suite must test this checkout, not a copy installed earlier
    assert Path(ssod_zoo.__file__).resolve().is_relative_to(os.environ['SSOD_ZOO_CHECKOUT']), ssod_zoo.__file__


def pytest_configure(config):
    for name in timm.list_models('ssod_*'):
        entrypoint = _registry._model_entrypoints[name]
        _registry._model_entrypoints[name] = functools.wraps(entrypoint)(
            functools.partial(entrypoint, return_ood=False))
