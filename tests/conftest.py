"""Suite-wide options and fixtures: tests marked ``slow`` are skipped, and listed as skipped, unless ``--runslow``
is given; ``small_bench`` is one tiny synthetic benchmark shared by the files that only need some images."""
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


@pytest.fixture(scope='session')
def small_bench(tmp_path_factory):
    """The root of a 3-class, 64 px synthetic benchmark: 8 training and 4 validation images per class, 6 per OOD
    set. Read-only: copy what a test modifies."""
    from ssod_zoo.app.synthetic import BenchmarkConfig, SyntheticBenchmark
    config = BenchmarkConfig(num_classes=3, image_size=64, train_per_class=8, val_per_class=4, ood_per_set=6)
    return SyntheticBenchmark(tmp_path_factory.mktemp('small_bench'), config).prepare(workers=1, progress=False).root
