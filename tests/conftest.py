"""Suite-wide options: tests marked ``slow`` are skipped, and listed as skipped, unless ``--runslow`` is given."""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=os.environ.get('SSOD_ZOO_RUN_SLOW') == '1',
                     help='also run the tests marked slow (or set SSOD_ZOO_RUN_SLOW=1)')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow') or 'slow' in (config.getoption('-m') or ''):
        return
    skip = pytest.mark.skip(reason='slow: run with --runslow (or SSOD_ZOO_RUN_SLOW=1, or -m slow)')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)
