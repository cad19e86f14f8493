"""The study harness's pairing of a candidate with its cross-entropy twin (benchmarks/study.py)."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted((ROOT / 'benchmarks' / 'results' / 'study').glob('*/*.json'))


@pytest.fixture
def study(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location('study', ROOT / 'benchmarks' / 'study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, 'CACHE', tmp_path / 'cache')
    monkeypatch.setattr(module, 'OUT', tmp_path / 'out')
    return module


def test_the_records_exist():
    assert len(RECORDS) >= 20, RECORDS


@pytest.mark.parametrize('path', RECORDS, ids=lambda p: f'{p.parent.name}/{p.stem}')
def test_every_record_names_the_twin_that_twin_derives(study, path):
    """A run trained with ``--train ce`` on a GPU is found again by the evaluation that follows only if both derive
    the same twin; the committed records hold the names their runs were trained under (all but the paper224 ones by
    the code before twin() existed)."""
    record = json.loads(path.read_text())
    overrides, ce_name, _ = study.twin(record['name'])
    assert ce_name == record['ce_twin']
    overrides.pop('classes', None)  # the benchmark's, not the recipe's: the record's config leaves it out
    assert {**study.BASE, **overrides} == record['config']


@pytest.mark.parametrize('side', ['ssod', 'ce'])
@pytest.mark.parametrize('name', ['r18-224-scratch', 'scratch-detach-e34'])
def test_train_only_trains_that_side(study, monkeypatch, side, name):
    calls = []
    monkeypatch.setattr(study, 'train_run', lambda run, overrides, seed, bench, ce, gpu_only: calls.append(
        (run, overrides, seed, ce, gpu_only)))
    monkeypatch.setattr(study, 'benchmarks', lambda classes: {'test': SimpleNamespace(), 'val': SimpleNamespace()})
    study.run('drift', [name], [2], 'val', train_only=side)
    overrides, ce_name, ce_overrides = study.twin(name)
    gpu = name == 'r18-224-scratch'
    assert calls == [(name, overrides, 2, False, gpu) if side == 'ssod' else (ce_name, ce_overrides, 2, True, gpu)]
    assert not list((study.OUT / 'drift').glob('*.json'))  # nothing evaluated
    # the twin trains as the SSOD run does (the system settings too), without the SSOD-only settings
    assert {k: v for k, v in overrides.items() if k != 'ood_detach'} == ce_overrides


def test_a_gpu_configuration_is_not_trained_on_a_cpu(study, monkeypatch):
    monkeypatch.setattr(study.torch.cuda, 'is_available', lambda: False)
    overrides, _, _ = study.twin('r18-224-scratch')
    with pytest.raises(SystemExit, match='needs a GPU.*gpu_session.sh'):
        study.train_run('r18-224-scratch', overrides, 0, bench=None, ce=False, gpu_only=True)
    assert not (study.CACHE / 'runs').exists()


def test_train_is_refused_with_auto(study, capsys):
    with pytest.raises(SystemExit):
        study.main(['--grid', 'auto', '--train', 'ce'])
    assert '--train trains one side' in capsys.readouterr().err
