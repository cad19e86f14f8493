"""benchmarks/located_positions.py: the classifier read where the OOD head finds the object."""
import json

import pytest
import timm
import torch

import ssod_zoo


@pytest.fixture
def lp(benchmark_script):
    return benchmark_script('located_positions')


def test_located_reads_the_score_at_the_locators_best_positions_not_its_own(lp):
    score = torch.tensor([[9.0, 1.0, 2.0, 3.0], [0.0, 5.0, 6.0, 7.0]])
    p_id = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.7, 0.6, 0.1, 0.2]])
    torch.testing.assert_close(lp.located(score, p_id, 1), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(lp.located(score, p_id, 2), torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(lp.located(score, p_id, 9), score.mean(1))  # more than the map: all of it
    # maps (B, h, w) read the same as their flattened positions
    torch.testing.assert_close(lp.located(score.view(2, 2, 2), p_id.view(2, 2, 2), 2), torch.tensor([1.5, 2.5]))


def test_each_readout_of_a_batch_against_the_model_by_hand(lp):
    torch.manual_seed(0)
    model = timm.create_model('ssod_test_resnet', num_classes=4, output_stride=16).eval()
    x = torch.randn(3, 3, 64, 64)
    got = lp.score_batch(model, x, ce=False)
    assert set(got) == {*lp.READOUTS, *lp.MEANS}
    with torch.no_grad():
        s = model.forward_spatial(x)
    torch.testing.assert_close(got['top3'], ssod_zoo.spatial_maxlogit_score(s.cls_map))
    best = s.cls_map.amax(1).flatten(1)
    p_id = torch.sigmoid(s.ood_map[:, 1] - s.ood_map[:, 0]).flatten(1)  # the 2-way softmax's ID output
    for k in lp.KS:
        order = p_id.argsort(1, descending=True)[:, :k]
        torch.testing.assert_close(got[f'loc{k}'], torch.stack([b[o].mean() for b, o in zip(best, order)]))
    torch.testing.assert_close(got['pid_weighted'], (p_id * best).sum(1) / p_id.sum(1))
    torch.testing.assert_close(got['agree'], (p_id.argmax(1) == best.argmax(1)).float())
    torch.testing.assert_close(got['drop3'], got['top3'] - got['loc3'])
    torch.testing.assert_close(got['confident'], (p_id >= 0.9).sum(1).float())
    # reading the classifier somewhere other than its own best positions can only lower the score
    assert (got['loc3'] <= got['top3'] + 1e-6).all()
    assert set(lp.score_batch(model, x, ce=True)) == {'top3'}  # the twin has no OOD head


def _result(seed, ref, located):
    image = {'top3': {'average': {'fpr95': ref}}}
    image.update({name: {'average': {'fpr95': v}} for name, v in zip(('a', 'b'), located)})
    return {'run': f'lrdecay-e16-s{seed}', 'models': {'ssod': {'image': image}}}


def test_the_test_sets_take_only_a_readout_validation_adopted(lp, monkeypatch, tmp_path):
    monkeypatch.setattr(lp, 'FAMILIES', {'located': ('a', 'b')})
    monkeypatch.setattr(lp, 'OUT', tmp_path)
    monkeypatch.setattr(lp, 'run_pairs', lambda *a: pytest.fail('scored the test sets'))
    with pytest.raises(SystemExit, match='only for a readout that met the adoption rule'):
        lp.main(['--test'])  # no validation records

    def save(records):
        for run, record in zip(lp.RUNS, records):
            (tmp_path / f'{run}.json').write_text(json.dumps(record))
    save([_result(s, 22.0, (23.0, 19.5)) for s in range(3)])  # 'b' 2.5 below in each seed
    calls = []
    monkeypatch.setattr(lp, 'run_pairs', lambda argv, doc, out, measure, *a: calls.append((argv, out, measure)))
    monkeypatch.setattr(lp, 'measure', lambda run, ce_run, which, keep: (which, keep))
    lp.main(['--test'])
    (argv, out, measure), = calls[:1]
    assert out == tmp_path / 'test' and argv[argv.index('--runs') + 1:argv.index('--ce-runs')] == [
        f'lrdecay-e16-s{s}' for s in range(5)]
    assert measure('r', 'c') == ('test', ['top3', 'b'])
    lp.main(['--test', '--summary', 'again.md'])  # the seeds stay the headline's; only the summary is renamed
    assert calls[-1][0][calls[-1][0].index('--runs') + 1] == 'lrdecay-e16-s0' and calls[-1][0][-2:] == [
        '--summary', 'again.md']
    with pytest.raises(SystemExit, match='leave out --runs and --ce-runs'):
        lp.main(['--test', '--runs', 'lrdecay-e16-s0', '--ce-runs', 'x'])  # no scoring a chosen subset
    save([_result(s, 22.0, (23.0, 18.0 if s else 23.0)) for s in range(3)])  # 2.33 below, higher in seed 0
    with pytest.raises(SystemExit, match='only for a readout that met the adoption rule'):
        lp.main(['--test'])
