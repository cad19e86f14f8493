"""The study harness's pairing of a candidate with its cross-entropy twin (benchmarks/study.py)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted((ROOT / 'benchmarks' / 'results' / 'study').glob('*/*.json'))


@pytest.fixture(scope='module')
def study():
    spec = importlib.util.spec_from_file_location('study', ROOT / 'benchmarks' / 'study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_records_exist():
    assert len(RECORDS) >= 20, RECORDS


@pytest.mark.parametrize('path', RECORDS, ids=lambda p: f'{p.parent.name}/{p.stem}')
def test_every_record_names_the_twin_that_twin_derives(study, path):
    """A run trained with ``--train ce`` on a GPU is found again by the evaluation that follows only if both derive
    the same twin; the committed records hold the names the cached CPU runs were trained under."""
    record = json.loads(path.read_text())
    overrides, ce_name, ce_overrides = study.twin(record['name'])
    assert ce_name == record['ce_twin']
    overrides.pop('classes', None)  # the benchmark's, not the recipe's: the record's config leaves it out
    assert {**study.BASE, **overrides} == record['config']
    assert 'ood_detach' not in ce_overrides and 'gamma' not in ce_overrides
