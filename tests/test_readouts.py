"""The project's readouts beyond Eq. 15: the full-posterior scores, pooled and at the best position."""
import pytest
import timm
import torch

import ssod_zoo
from ssod_zoo import posterior_score, robust_posterior, spatial_posterior_score


def test_pooled_posterior_scores_are_the_two_factors_of_eq7():
    torch.manual_seed(0)
    logits, p_id = torch.randn(6, 4) * 3, torch.rand(6)
    energy_form = posterior_score(logits, p_id, 'energy')
    torch.testing.assert_close(energy_form, torch.logsumexp(logits, 1) + p_id.log())
    # MSP x P_ID is the largest known-class probability of the Eq. 7 posterior
    torch.testing.assert_close(posterior_score(logits, p_id, 'msp'), robust_posterior(logits, p_id)[:, :-1].amax(1))
    # each factor moves the score: a lower P_ID or flatter logits lower it
    assert (posterior_score(logits, p_id / 2) < energy_form).all()
    assert (posterior_score(logits / 2, p_id, 'msp') < posterior_score(logits, p_id, 'msp')).all()  # (max softmax
    # falls as the temperature rises, where the top logit is unique)
    with pytest.raises(ValueError, match="kind is 'energy' or 'msp'"):
        posterior_score(logits, p_id, 'max')


def test_the_posterior_refuses_a_score_that_is_not_a_probability():
    """Eq. 7 needs P(x in S_ID | x): a spatial score (a logit) in its place gave negative "probabilities"."""
    logits = torch.randn(2, 4)
    for fn in (robust_posterior, posterior_score):
        with pytest.raises(ValueError, match=r'in \[0, 1\] .*got values from -3.007 to 1.5: a score such as '
                                             'spatial_score is not a probability'):
            fn(logits, torch.tensor([-3.0075, 1.5]))
    nan = robust_posterior(logits, torch.tensor([0.5, float('nan')]))  # a never-trained head's factor passes
    assert nan[0].sum().item() == pytest.approx(1.0) and nan[1].isnan().all()


def test_the_posterior_and_the_scores_compile_into_one_graph():
    """The range check of Eq. 7's factor and the train-mode warning are eager-only: in a compiled graph they would
    break it (fullgraph refuses a branch on values and a warnings call)."""
    logits, p_id = torch.randn(3, 4), torch.rand(3)
    both = torch.compile(lambda z, p: (robust_posterior(z, p), posterior_score(z, p)), fullgraph=True,
                         backend='eager')
    for got, want in zip(both(logits, p_id), (robust_posterior(logits, p_id), posterior_score(logits, p_id))):
        torch.testing.assert_close(got, want)
    model = timm.create_model('ssod_test_resnet', num_classes=3)  # train mode, as timm creates it
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        compiled = torch.compile(model.forward_scores, fullgraph=True, backend='eager')(x)
    assert compiled.spatial_score.shape == (2,)


def test_spatial_score_is_the_best_position_of_the_per_position_heads():
    torch.manual_seed(0)
    model = timm.create_model('ssod_test_resnet', num_classes=5, output_stride=16).eval()
    with torch.no_grad():
        for p in model.parameters():  # random heads, so positions differ clearly
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(3, 3, 96, 96)
        cls_map, ood_map = model.forward_positions(model.forward_features(x))
        score = spatial_posterior_score(cls_map, ood_map)
        energy_only = spatial_posterior_score(cls_map)
    assert cls_map.shape == (3, 5, 6, 6) and ood_map.shape == (3, 2, 6, 6)
    # position by position, the pooled formula on that position's 1x1 crop of the feature map
    features = model.forward_features(x).detach()
    best = torch.full((3,), -float('inf'))
    for i in range(6):
        for j in range(6):
            crop = features[..., i:i + 1, j:j + 1]
            pre = model.forward_head(crop, pre_logits=True)
            logits = model.get_classifier()(pre)
            best = torch.maximum(best, posterior_score(logits, model.forward_ood(pre), 'energy'))
    torch.testing.assert_close(score, best.detach(), rtol=1e-4, atol=1e-4)
    assert score.std() > 1e-2  # the images are told apart, not a constant
    assert (score <= energy_only + 1e-6).all()  # log P_ID <= 0


def test_spatial_score_rejects_unpooled_shapes():
    with pytest.raises(ValueError, match=r'cls_map \(B, M, h, w\)'):
        spatial_posterior_score(torch.randn(2, 5))
    assert 'spatial_posterior_score' in ssod_zoo.__all__ and 'spatial_maxlogit_score' in ssod_zoo.__all__


@pytest.mark.parametrize('name', ['ssod_mobilenetv3_large_100', 'ssod_resnet18'])
def test_collect_gives_the_models_own_outputs_from_one_head_pass(name):
    """evaluate.collect classifies the pooled pre-logits it keeps (one pass of MobileNetV3's conv_head); the logits
    must be timm's own forward_head's, and every score the model's own: what `ssod eval` and the demo report."""
    from torch.utils.data import DataLoader, TensorDataset

    from ssod_zoo.app.evaluate import collect
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).eval()
    x = torch.randn(3, 3, 64, 64)
    out = collect(model, DataLoader(TensorDataset(x, torch.zeros(3, dtype=torch.long))), torch.device('cpu'),
                  spatial=True)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x))
        scores = model.forward_scores(x)
    torch.testing.assert_close(out['logits'], want)
    torch.testing.assert_close(out['ood_factor'], scores.ood_factor)
    torch.testing.assert_close(out['spatial_top3'], scores.spatial_score)


def test_spatial_maxlogit_score_is_the_mean_of_the_k_best_positions_maxlogit():
    torch.manual_seed(0)
    cls_map = torch.randn(4, 5, 3, 3) * 2
    per_position = cls_map.amax(1).flatten(1)  # (4, 9)
    want = torch.tensor([sum(sorted(row.tolist(), reverse=True)[:3]) / 3 for row in per_position])
    torch.testing.assert_close(ssod_zoo.spatial_maxlogit_score(cls_map), want)
    # k = 1 is the best position's MaxLogit; k beyond h * w averages every position
    torch.testing.assert_close(ssod_zoo.spatial_maxlogit_score(cls_map, k=1), per_position.amax(1))
    torch.testing.assert_close(ssod_zoo.spatial_maxlogit_score(cls_map, k=100), per_position.mean(1))
    with pytest.raises(ValueError, match='k must be >= 1'):
        ssod_zoo.spatial_maxlogit_score(cls_map, k=0)
    with pytest.raises(ValueError, match=r'\(B, M, h, w\)'):
        ssod_zoo.spatial_maxlogit_score(cls_map.flatten(2))


def test_evaluate_scores_the_position_readouts_on_both_models(tmp_path):
    """The study's readout on the SSOD model and the same classifier-only readout on the CE model, as separate rows:
    a gain of the readout is not credited to SSOD training."""
    from torch.utils.data import DataLoader, TensorDataset

    from ssod_zoo.app.evaluate import evaluate
    torch.manual_seed(0)
    ssod_model = timm.create_model('ssod_test_resnet', num_classes=3, output_stride=16).eval()
    ce_model = timm.create_model('ssod_test_resnet', num_classes=3, output_stride=16).eval()
    x = torch.randn(14, 3, 64, 64)
    data = lambda s: DataLoader(TensorDataset(x[s], torch.arange(14)[s] % 3), batch_size=4)  # noqa: E731
    res = evaluate(ssod_model, data(slice(0, 8)), {'noise': data(slice(8, 14))}, baseline_model=ce_model,
                   methods=['ssod_spatial_top3', 'maxlogit_spatial_top3', 'ssod'], progress=False)
    ssod_scores, ce_scores = res['scores']['ssod_spatial_top3'], res['scores']['maxlogit_spatial_top3']
    with torch.no_grad():
        for model, got in ((ssod_model, ssod_scores), (ce_model, ce_scores)):
            cls_map, _ = model.forward_positions(model.forward_features(x[:8]))
            torch.testing.assert_close(got['id'], ssod_zoo.spatial_maxlogit_score(cls_map))
    assert set(res['ood']['noise']) == {'ssod_spatial_top3', 'maxlogit_spatial_top3', 'ssod'}
