"""benchmarks/odin_positions.py: ODIN's input step and temperature on the 3 best positions, and the adoption rule."""
import json

import pytest
import timm
import torch

import ssod_zoo


@pytest.fixture
def pp(benchmark_script):
    return benchmark_script('odin_positions')


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('ssod_test_resnet', num_classes=4, output_stride=16).eval()


def test_each_step_moves_the_image_along_its_own_gradient_sign_and_each_temperature_tempers_the_positions(pp, model):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # whatever ran before
    got = pp.score_batch(model, x, ce=False)
    assert set(got) == set(pp.READOUTS)
    xx = x.clone().requires_grad_(True)
    score = ssod_zoo.spatial_maxlogit_score(model.forward_positions(model.forward_features(xx))[0]).sum()
    sign = torch.autograd.grad(score, xx)[0].sign()
    with torch.no_grad():
        torch.testing.assert_close(got['top3'], ssod_zoo.spatial_maxlogit_score(model.forward_spatial(x).cls_map))
        for e in pp.EPSILONS:
            moved = model.forward_spatial(x + e * sign).cls_map
            torch.testing.assert_close(got[f'top3_eps{e:g}'], ssod_zoo.spatial_maxlogit_score(moved))
        cls = model.forward_spatial(x).cls_map
        for t in pp.TEMPERATURES:  # each position's tempered MSP, the 3 best by that score
            per_position = torch.softmax(cls.double() / t, 1).amax(1).flatten(1)
            best3 = per_position.sort(1, descending=True).values[:, :3].mean(1)
            torch.testing.assert_close(got[f'top3_msp_T{t}'], best3)
    # a step up the readout's gradient raises it, image by image, at the smallest step
    assert (got[f'top3_eps{pp.EPSILONS[0]:g}'] > got['top3']).all()
    assert all(p.grad is None for p in model.parameters())  # the model's parameters are left alone


def test_a_large_temperature_picks_the_positions_where_one_class_stands_out_not_the_highest_logits(pp):
    # four positions of 4 classes: one with every logit high (MaxLogit's best), three with one logit standing out
    cls = torch.tensor([[10.0] * 4, [8.0, 0, 0, 0], [6.0, 0, 0, 0], [4.0, 0, 0, 0]]).T.reshape(1, 4, 2, 2)
    tempered = (cls.double() / 1000).softmax(1).amax(1).flatten()
    assert tempered[0] == tempered.min()  # the uniformly high position reads exactly 1 / M
    torch.testing.assert_close(pp.tempered_top3(cls, 1000), tempered[1:].mean().reshape(1))
    torch.testing.assert_close(ssod_zoo.spatial_maxlogit_score(cls), torch.tensor([8.0]))  # 10, 8, 6


def test_the_ce_side_adds_odin_and_its_temperature_alone(pp, model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    got = pp.score_batch(model, x, ce=True)

    def logits(t):
        return model.forward_head(model.forward_features(t))
    torch.testing.assert_close(got['odin'], ssod_zoo.scores.odin(logits, x))
    with torch.no_grad():
        torch.testing.assert_close(got['odin_eps0'], (logits(x) / 1000).softmax(1).amax(1))


def _result(seed, ref, steps, temperatures=(30.0, 30.0)):
    image = {'top3': {'average': {'fpr95': ref}}}
    for names, values in ((('a', 'b'), steps), (('c', 'd'), temperatures)):  # the step family, the temperature one
        image.update({name: {'average': {'fpr95': v}} for name, v in zip(names, values)})
    return {'run': f'lrdecay-e16-s{seed}', 'models': {'ssod': {'image': image}}}


@pytest.fixture
def two_families(pp, monkeypatch):
    monkeypatch.setattr(pp, 'FAMILIES', {'step': ('a', 'b'), 'temperature': ('c', 'd')})
    monkeypatch.setattr(pp, 'READOUTS', ('top3', 'a', 'b', 'c', 'd'))
    return pp


@pytest.mark.parametrize('steps, best, meets', [
    (((20.0, 21.0), (19.0, 21.0), (18.0, 21.0)), 'a', True),  # 3.0 below on average, lower in each seed
    (((21.0, 20.5), (21.0, 20.0), (21.0, 19.9)), 'b', False),  # the best step is 1.87 below
    (((15.0, 30.0), (15.0, 30.0), (22.5, 30.0)), 'a', False),  # 4.5 below, but higher in one seed
    (((20.0, 30.0), (20.0, 30.0), (20.0, 30.0)), 'a', True),  # exactly 2.0 below: "at least"
])
def test_the_adoption_rule_takes_the_best_of_a_family_and_asks_for_2_points_in_each_seed(two_families, steps, best,
                                                                                         meets):
    pp = two_families
    results = [_result(s, 22.0, v) for s, v in enumerate(steps)]
    assert pp.best_of(results, 'step')[0] == best
    step_line, temperature_line = pp.verdict(results)
    assert f'`{best}`' in step_line and step_line.endswith('**meets the adoption rule**') == meets
    assert temperature_line.endswith('does not meet the adoption rule')  # 30.0 against 22.0
    assert not any(line.endswith('**') for line in pp.verdict(results[:2]))  # under 3 seeds never does


def test_the_test_sets_take_only_the_readouts_validation_adopted(two_families, monkeypatch, tmp_path):
    pp = two_families
    monkeypatch.setattr(pp, 'OUT', tmp_path)
    monkeypatch.setattr(pp, 'run_pairs', lambda *a: pytest.fail('scored the test sets'))
    with pytest.raises(SystemExit, match='only for a readout that met the adoption rule'):
        pp.main(['--test'])  # no validation records
    records = [_result(s, 22.0, (25.0, 25.0), (19.0, 24.0)) for s in range(3)]
    for run, record in zip(pp.RUNS, records):
        (tmp_path / f'{run}.json').write_text(json.dumps(record))
    assert pp.chosen_readouts() == ['c']  # the temperature family's best, 3.0 below in each seed
    calls = []
    monkeypatch.setattr(pp, 'run_pairs', lambda argv, doc, out, measure, *a: calls.append((argv, out, measure)))
    monkeypatch.setattr(pp, 'measure', lambda run, ce_run, which, keep: (which, keep))
    pp.main(['--test'])
    (argv, out, measure), = calls
    assert out == tmp_path / 'test' and argv[argv.index('--runs') + 1:argv.index('--ce-runs')] == [
        f'lrdecay-e16-s{s}' for s in range(5)]
    assert measure('r', 'c') == ('test', ['top3', 'c', 'odin'])
    for record in records:
        record['models']['ssod']['image']['c']['average']['fpr95'] = 21.0  # 1.0 below: nothing adopted
    for run, record in zip(pp.RUNS, records):
        (tmp_path / f'{run}.json').write_text(json.dumps(record))
    with pytest.raises(SystemExit, match='only for a readout that met the adoption rule'):
        pp.main(['--test'])


@pytest.mark.parametrize('name', ['odin_positions', 'located_positions'])
def test_the_committed_summaries_regenerate_from_their_records(benchmark_script, tmp_path, name):
    script = benchmark_script(name)
    records = [json.loads((script.OUT / f'{run}.json').read_text()) for run in script.RUNS]
    script.write(records, tmp_path / 'summary.md')
    assert (tmp_path / 'summary.md').read_text() == (script.OUT / 'summary.md').read_text()
    assert (tmp_path / 'summary.png').stat().st_size > 10_000
