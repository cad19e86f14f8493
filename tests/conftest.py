"""Suite-wide options and fixtures: tests marked ``slow`` are skipped, and listed as skipped, unless ``--runslow``
is given; the data cache is the session's own; ``small_bench`` is one tiny synthetic benchmark shared by the files
that only need some images."""
import importlib.util
import os
import sys
from pathlib import Path

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


@pytest.fixture(scope='session', autouse=True)
def own_data_cache(tmp_path_factory):
    """The data sets the commands unpack or generate (Fashion-MNIST's IDX files, the synthetic benchmark) go to a
    folder of this session, not to ~/.cache/ssod_zoo: no test reads what an earlier session left there."""
    mp = pytest.MonkeyPatch()
    mp.setenv('SSOD_ZOO_CACHE', str(tmp_path_factory.mktemp('ssod_zoo_cache')))
    yield
    mp.undo()


@pytest.fixture(scope='session')
def small_bench(tmp_path_factory):
    """The root of a 3-class, 64 px synthetic benchmark: 8 training and 4 validation images per class, 6 per OOD
    set. Read-only: copy what a test modifies."""
    from ssod_zoo.app.synthetic import BenchmarkConfig, SyntheticBenchmark
    config = BenchmarkConfig(num_classes=3, image_size=64, train_per_class=8, val_per_class=4, ood_per_set=6)
    return SyntheticBenchmark(tmp_path_factory.mktemp('small_bench'), config).prepare(workers=1, progress=False).root


BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


@pytest.fixture
def benchmark_script(monkeypatch):
    """``benchmark_script('real_ood')``: a script of ``benchmarks/`` imported as a module, with that folder on the
    path for the siblings it imports (``study``, ``probe_ood_head``, ...), which are dropped again afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    before = set(sys.modules)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    yield load
    for name in set(sys.modules) - before:
        if Path(getattr(sys.modules[name], '__file__', None) or '').parent == BENCHMARKS:
            sys.modules.pop(name)
