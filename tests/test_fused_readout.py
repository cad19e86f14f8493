"""The fused readouts of benchmarks/fused_readout.py, against the model's own outputs, and the runs it picks."""

import pytest
import timm
import torch


@pytest.fixture
def fused(benchmark_script, tmp_path, monkeypatch):
    module = benchmark_script('fused_readout')
    monkeypatch.setattr(module, 'CACHE', tmp_path / 'cache')
    return module


def test_the_readouts_are_their_parts_summed(fused):
    torch.manual_seed(0)
    model = timm.create_model('ssod_test_resnet', num_classes=4).eval()
    x = torch.randn(6, 3, 64, 64)
    got = fused.scores(model, [(x[:4], None), (x[4:], None)])  # two batches, as a loader gives them
    with torch.no_grad():
        logits, p_id = model(x)  # the Eq. 15 OOD factor, by the model's own forward
        cls_map = model.forward_spatial(x).cls_map
    top3 = cls_map.amax(dim=1).flatten(1).topk(3, dim=1).values.mean(dim=1)
    energy = logits.logsumexp(dim=1)
    torch.testing.assert_close(got['top3'], top3)
    torch.testing.assert_close(got['energy'], energy)
    torch.testing.assert_close(got['fused'], top3 + energy)
    torch.testing.assert_close(got['fused_pid'], top3 + energy + p_id.log())


def test_all_pairs_takes_the_10_class_runs_with_both_checkpoints(fused):
    def cache(run):
        (fused.CACHE / 'runs' / run).mkdir(parents=True)
        (fused.CACHE / 'runs' / run / 'last.pt').touch()

    ce_8 = 'ce-batch_size64-epochs8-lr0.0005'
    for run in ('paper-e8-s0', f'{ce_8}-s0',  # a pair: taken
                'paper-e8-s1',  # its twin missing: skipped
                'm3-paper-s0', 'ce-batch_size64-classes3-epochs8-lr0.0005-warmup_epochs2-s0'):  # 3 classes: skipped
        cache(run)
    assert fused.all_pairs() == ['--runs', 'paper-e8-s0', '--ce-runs', f'{ce_8}-s0']


def test_grid_takes_that_grids_runs_only(fused):
    ce_8, ce_16 = 'ce-batch_size64-epochs8-lr0.0005', 'ce-batch_size64-epochs16-lr0.0005-lr_step4'
    for run in ('paper-e8-s1', f'{ce_8}-s1', 'lrdecay-e16-s1', f'{ce_16}-s1'):
        (fused.CACHE / 'runs' / run).mkdir(parents=True)
        (fused.CACHE / 'runs' / run / 'last.pt').touch()
    # paper-e8-s1 is in the ablate grid, lrdecay-e16-s1 in the alpha and test grids
    assert fused.all_pairs('ablate') == ['--runs', 'paper-e8-s1', '--ce-runs', f'{ce_8}-s1']
    assert fused.all_pairs('alpha') == ['--runs', 'lrdecay-e16-s1', '--ce-runs', f'{ce_16}-s1']
    with pytest.raises(SystemExit, match='--grid wants a study grid.*ablate'):
        fused.main(['--grid', 'no-such-grid'])


def test_write_gives_each_configs_means(fused, tmp_path):
    def record(run, ssod_top3, ce_top3):
        def fpr(top3):
            return {m: {'near': top3, 'average': top3 + k} for k, m in enumerate(fused.READOUTS)}
        return {'run': run, 'sets': ['near'], 'fpr95': {'ssod': fpr(ssod_top3), 'ce': fpr(ce_top3)},
                'auroc': {'ssod': fpr(90.0), 'ce': fpr(90.0)}, 'check': {}}
    results = [record('lrdecay-e16-s0', 20.0, 23.0), record('lrdecay-e16-s1', 22.0, 23.0),
               record('alpha3-e16-s0', 21.0, 21.0)]
    fused.write(results, tmp_path / 'summary.md')
    text = (tmp_path / 'summary.md').read_text()
    # lrdecay-e16: SSOD top3 (20 + 22) / 2 = 21, fused 2 more (its offset here), the twin's fused 25; gains 23 - 21
    assert '| lrdecay-e16 | 2 | 21.00 | 23.00 | 25.00 | +2.00 | +2.00 | +2.00 |' in text
    assert '| alpha3-e16 | 1 | 21.00 | 23.00 | 23.00 | +0.00 | +0.00 | +0.00 |' in text
