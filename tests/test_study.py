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


def test_train_only_rebuilds_the_checkpoints_of_a_finished_run_and_keeps_its_record(study, monkeypatch):
    """The diagnostics read checkpoints from the study cache, which a new machine lacks: ``--train`` is how they are
    rebuilt for runs whose records exist, so it must not skip those runs as the evaluation does."""
    calls = []
    monkeypatch.setattr(study, 'train_run', lambda run, overrides, seed, bench, ce, gpu_only: calls.append((run, ce)))
    monkeypatch.setattr(study, 'benchmarks', lambda classes: {'test': SimpleNamespace(), 'val': SimpleNamespace()})
    record = study.OUT / 'test' / 'lrdecay-e16-s0.json'
    record.parent.mkdir(parents=True)
    record.write_text('{"kept": true}')
    study.run('test', ['lrdecay-e16'], [0], 'test', train_only='ce')
    assert calls == [(study.twin('lrdecay-e16')[1], True)]
    assert json.loads(record.read_text()) == {'kept': True}
    calls.clear()
    monkeypatch.setattr(study, 'summarise', lambda: None)  # it would read the stand-in record
    study.run('test', ['lrdecay-e16'], [0], 'test')  # evaluating still skips the finished run
    assert calls == []


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


def _record(name, seed, near, avg, energy, acc):
    """A study record with only what paired_per_set reads: (SSOD, CE twin) pairs of FPR95 and ID accuracy."""
    def pair(ssod, ce):
        return {'pos_top3_maxlogit': {'fpr95': ssod}, 'ce_pos_top3_maxlogit': {'fpr95': ce}}
    average = {**pair(*avg), 'ssod_energy': {'fpr95': energy[0]}, 'energy': {'fpr95': energy[1]}}
    return {'name': name, 'seed': seed, 'ood': {'near': pair(*near), 'average': average},
            'id_accuracy': {'ssod': acc[0], 'ce': acc[1]}}


def test_paired_per_set_gives_twin_minus_ssod_per_row(study):
    records = [_record('a', 0, near=(60.0, 65.0), avg=(30.0, 31.0), energy=(40.0, 44.0), acc=(96.0, 97.0)),
               _record('a', 1, near=(70.0, 69.0), avg=(33.0, 32.0), energy=(41.0, 43.0), acc=(97.0, 97.0)),
               _record('b', 0, near=(50.0, 50.0), avg=(20.0, 20.0), energy=(30.0, 30.0), acc=(95.0, 95.5))]
    lines = study.paired_per_set(records, lambda r: r['name'], 'config')
    assert lines[0].startswith('| config | n | near | textures |')
    # near: (65-60 + 69-70) / 2 = +2.00, SSOD better in 1 of 2; average: (1 - 1) / 2; Energy (4 + 2) / 2;
    # accuracy (-1 + 0) / 2. textures, domain and fmnist are in no record: empty cells
    assert lines[2] == '| a | 2 | +2.00 (1 of 2) |  |  |  | +0.00 (1 of 2) | +3.00 (2 of 2) | -0.50 |'
    assert lines[3] == '| b | 1 | +0.00 (0 of 1) |  |  |  | +0.00 (0 of 1) | +0.00 (0 of 1) | -0.50 |'


def test_family_names_backbone_resolution_initialisation_and_a_non_paper_alpha(study):
    def family(**overrides):
        return study._family({'config': {**study.BASE, **overrides}})
    assert family() == 'test_resnet, 96 px'  # paper-e8: fine-tuned from the shipped CE classifier, alpha 1
    assert family(**study.CONFIGS['alpha3-e16']) == 'test_resnet, 96 px, alpha 3'
    assert family(**study.CONFIGS['scratch-alpha3-e34']) == 'test_resnet, 96 px, from scratch, alpha 3'
    assert family(**study.CONFIGS['r18-96-scratch-e16']) == 'resnet18, 96 px, from scratch'
    assert family(**study.CONFIGS['scratch-alpha3-warm6-e34']) == 'test_resnet, 96 px, from scratch, warmup 6, alpha 3'


def test_score_sets_scores_each_readout_against_the_id_images_and_averages_only_the_quantities_in_means(study):
    import torch
    from torch.utils.data import TensorDataset
    from ssod_zoo.metrics import ood_metrics

    torch.manual_seed(0)
    x = {'id': torch.randn(40) + 2, 'near': torch.randn(30) + 1, 'far': torch.randn(30) - 1}
    sets = {name: TensorDataset(v[:, None], torch.zeros(len(v))) for name, v in x.items()}

    def score_batch(model, batch, ce):
        return {'s': batch[:, 0], 'flipped': -batch[:, 0], 'q': 10 * batch[:, 0]} if not ce else {'s': batch[:, 0]}
    got = study.score_sets(torch.nn.Identity(), sets, score_batch, False, means=('q',))
    assert set(got['image']) == {'s', 'flipped'} and set(got['mean']) == {'q'}
    for r, sign in (('s', 1), ('flipped', -1)):
        for name in ('near', 'far'):
            want = ood_metrics(sign * x['id'], sign * x[name])
            assert got['image'][r][name] == pytest.approx({m: 100 * float(want[m]) for m in ('fpr95', 'auroc')})
        assert got['image'][r]['average']['fpr95'] == pytest.approx(
            (got['image'][r]['near']['fpr95'] + got['image'][r]['far']['fpr95']) / 2)
    assert got['image']['s']['far']['auroc'] > got['image']['s']['near']['auroc'] > 50 > got['image']['flipped'][
        'near']['auroc']
    assert got['mean']['q'] == pytest.approx({name: 10 * float(v.mean()) for name, v in x.items()}, rel=1e-5)
    kept = study.score_sets(torch.nn.Identity(), sets, score_batch, True, keep=['s', 'flipped'], means=('q',))
    assert set(kept) == {'image'} and set(kept['image']) == {'s'}  # the CE side: only what its batch gives


def test_adopted_readouts_needs_every_run_and_skips_a_family_the_records_lack(study, tmp_path):
    def record(ref, a, b):
        image = {'top3': ref, 'a': a, 'b': b}
        return {'models': {'ssod': {'image': {k: {'average': {'fpr95': v}} for k, v in image.items()}}}}
    runs = ['r0', 'r1', 'r2']
    for run, values in zip(runs, [(22.0, 19.0, 30.0), (22.0, 19.5, 30.0), (22.0, 20.0, 30.0)]):
        (tmp_path / f'{run}.json').write_text(json.dumps(record(*values)))
    assert study.adopted_readouts(tmp_path, runs, {'one': ('a', 'b')}) == ['a']  # 2.5 below, lower in each run
    assert study.adopted_readouts(tmp_path, runs, {'one': ('a', 'b'), 'later': ('c',)}) == ['a']
    assert study.adopted_readouts(tmp_path, runs, {'one': ('b',)}) == []
    assert study.adopted_readouts(tmp_path, [*runs, 'r3'], {'one': ('a', 'b')}) == []  # r3 not measured yet
    partial = record(22.0, 19.5, 30.0)
    del partial['models']['ssod']['image']['b']
    (tmp_path / 'r3.json').write_text(json.dumps(partial))  # a later record without the whole family
    assert study.adopted_readouts(tmp_path, [*runs, 'r3'], {'one': ('a', 'b')}) == []
    assert study.adopted_readouts(tmp_path, [*runs, 'r3'], {'one': ('a',)}) == ['a']


def test_the_rule_takes_exactly_2_points_as_2_points_in_floating_point(study):
    def result(ref, best):
        return {'models': {'ssod': {'image': {'top3': {'average': {'fpr95': ref}}, 'a': {'average': {'fpr95': best}}}}}}
    assert sum([23.15] * 3) / 3 - sum([21.15] * 3) / 3 < 2.0  # 1.9999999999999964, as the rule computes it
    assert study.rule_met([result(23.15, 21.15)] * 3, ('a',))
    assert not study.rule_met([result(23.15, 21.16)] * 3, ('a',))
