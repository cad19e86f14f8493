"""The patch sampler (Eq. 12) and the balanced objective (Eq. 14, Table 5) on hand-built maps."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssod_zoo import SpatialOutput
from ssod_zoo.loss import IGNORE, SSODLoss, _resample_equal, sample_patches


def _spatial(cls_map, ood_map, logits=None):
    b = cls_map.shape[0]
    logits = torch.zeros(b, cls_map.shape[1]) if logits is None else logits
    return SpatialOutput(features=torch.zeros(b, 1, *cls_map.shape[2:]), logits=logits,
                         ood_logits=torch.zeros(b, 2), cls_map=cls_map, ood_map=ood_map)


def _two_class_map(conf_on_label_0):
    """(1, 2, H, W) class logits whose softmax gives class 0 the given confidence at each position."""
    conf = torch.tensor(conf_on_label_0, dtype=torch.float64)
    return torch.stack([torch.log(conf / (1 - conf)), torch.zeros_like(conf)]).unsqueeze(0).float()


def test_sampler_thresholds():
    cls_map = _two_class_map([[0.99, 0.96, 0.94], [0.5, 0.06, 0.04]])
    labels = sample_patches(cls_map, torch.tensor([0]), gamma=0.95)
    assert labels.tolist() == [[[1, 1, IGNORE], [IGNORE, IGNORE, 0]]]
    # the same map read against the other label flips ID and OOD
    flipped = sample_patches(cls_map, torch.tensor([1]), gamma=0.95)
    assert flipped.tolist() == [[[0, 0, IGNORE], [IGNORE, IGNORE, 1]]]


def test_sampler_is_gradient_free_and_validates():
    cls_map = torch.randn(2, 3, 4, 4, requires_grad=True)
    saved = []  # autograd saves tensors for backward only when it records a graph
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        labels = sample_patches(cls_map, torch.tensor([0, 2]))
    assert not labels.requires_grad and not saved
    with pytest.raises(ValueError, match='gamma must be in'):
        sample_patches(cls_map, torch.tensor([0, 2]), gamma=0.4)
    with pytest.raises(TypeError, match='hard labels'):
        sample_patches(cls_map, torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match='expected cls_map'):
        sample_patches(cls_map, torch.tensor([0]))


# one image, 2x2 positions: ID, ID, OOD, ignored
CONF = [[0.99, 0.98], [0.01, 0.5]]


def _known_case(ce_id=(0.2, 0.6), ce_ood=1.5):
    cls_map = _two_class_map(CONF)
    # pick OOD-head logits so that per-patch CE is known: ID patches ce_id, OOD patch ce_ood
    a = torch.tensor([[-math.log(math.expm1(ce_id[0])), -math.log(math.expm1(ce_id[1]))],
                      [math.log(math.expm1(ce_ood)), 0.0]])
    ood_map = torch.stack([torch.zeros_like(a), a]).unsqueeze(0).requires_grad_(True)
    logits = torch.tensor([[2.0, 0.0]])
    return _spatial(cls_map, ood_map, logits), torch.tensor([0])


@pytest.mark.parametrize('balance, expected_ood', [
    ('lwb', ((0.2 + 0.6) / 2 + 1.5) / 2),
    ('lw', (0.2 + 0.6 + 1.5) / 3),
])
def test_known_values(balance, expected_ood):
    out, y = _known_case()
    parts = SSODLoss(balance=balance, alpha=0.5)(out, y)
    ce = F.cross_entropy(out.logits, y).item()
    assert parts.cls_loss.item() == pytest.approx(ce)
    assert parts.loss.item() == pytest.approx(ce + 0.5 * expected_ood, rel=1e-5)
    assert parts.ood_loss_id.item() == pytest.approx(0.4, rel=1e-5)
    assert parts.ood_loss_ood.item() == pytest.approx(1.5, rel=1e-5)
    assert [parts.frac_id.item(), parts.frac_ood.item(), parts.frac_ignored.item()] == [0.5, 0.25, 0.25]


def test_exposure_is_outlier_exposure_on_the_sampled_background():
    """The classifier's loss on the OOD patches is CE of its class softmax against uniform (torch's soft-target CE
    as the oracle). It is logged at any weight, enters the total only with exposure > 0 and the OOD loss on, and
    its gradient reaches the sampled OOD patch's class logits alone."""
    out, y = _known_case()
    cls_map = out.cls_map.clone().requires_grad_(True)
    out = out._replace(cls_map=cls_map)
    at_ood = cls_map[:, :, 1, 0]  # the one OOD patch: softmax 0.01 / 0.99
    expected = F.cross_entropy(at_ood, torch.full_like(at_ood, 0.5)).item()
    assert expected == pytest.approx(-(math.log(0.01) + math.log(0.99)) / 2, rel=1e-4)
    paper = SSODLoss()(out, y)
    assert paper.exposure_loss.item() == pytest.approx(expected, rel=1e-5)
    parts = SSODLoss(exposure=0.5)(out, y)
    assert parts.loss.item() == pytest.approx(paper.loss.item() + 0.5 * expected, rel=1e-5)
    assert parts.exposure_loss.item() == pytest.approx(expected, rel=1e-5)
    parts.loss.backward()
    touched = cls_map.grad.abs().sum(1)[0] > 0
    assert touched.tolist() == [[False, False], [True, False]]
    warmup = SSODLoss(exposure=0.5)(out, y, ood=False)
    assert warmup.loss.item() == pytest.approx(warmup.cls_loss.item())


@pytest.mark.parametrize('balance', ['lwb', 'dr'])
def test_exposure_value_with_more_classes_and_another_alpha(balance):
    """Four classes (the mean of the logits is not their midrange), alpha 0.5, and 'dr', which resamples the OOD
    head's patches but not the exposure's: the total is CE + 0.5 * OOD loss + 0.3 * the mean over *all* sampled OOD
    patches of torch's soft-target CE against uniform."""
    g = torch.Generator().manual_seed(3)
    cls_map = torch.randn(3, 4, 3, 3, generator=g) * 5
    y = torch.tensor([0, 2, 3])
    out = _spatial(cls_map, torch.randn(3, 2, 3, 3, generator=g))
    bg = sample_patches(cls_map, y) == 0
    assert 2 <= bg.sum() < bg.numel()
    at_bg = cls_map.permute(0, 2, 3, 1)[bg]  # (n, 4)
    expected = F.cross_entropy(at_bg, torch.full_like(at_bg, 0.25)).item()
    paper = SSODLoss(alpha=0.5, balance=balance)(out, y, generator=torch.Generator().manual_seed(0))
    parts = SSODLoss(alpha=0.5, balance=balance, exposure=0.3)(out, y, generator=torch.Generator().manual_seed(0))
    assert parts.exposure_loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts.loss.item() == pytest.approx(paper.loss.item() + 0.3 * expected, rel=1e-5)


def test_lw_background_weight():
    out, y = _known_case()
    parts = SSODLoss(balance='lw', background_weight=4.0, alpha=1.0)(out, y)
    expected = (0.2 + 0.6 + 4 * 1.5) / (2 + 4)
    assert parts.loss.item() - parts.cls_loss.item() == pytest.approx(expected, rel=1e-5)


def test_dr_keeps_min_of_id_and_ood_in_each_image_separately():
    """Image 0: 3 ID, 1 OOD -> 1 + 1 kept; image 1: 1 ID, 3 OOD -> 1 + 1 (a batch-wide min would keep 2 + 2)."""
    cls_map = torch.cat([_two_class_map([[0.99, 0.99], [0.99, 0.01]]),
                         _two_class_map([[0.99, 0.01], [0.01, 0.01]])])
    ood_map = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    parts = SSODLoss(balance='dr')(_spatial(cls_map, ood_map), torch.tensor([0, 0]),
                                   generator=torch.Generator().manual_seed(0))
    parts.loss.backward()
    touched = ood_map.grad.abs().sum(1) > 0  # (2, 2, 2)
    labels = sample_patches(cls_map, torch.tensor([0, 0]))
    for b in range(2):
        assert (touched[b] & (labels[b] == 1)).sum() == 1 and (touched[b] & (labels[b] == 0)).sum() == 1


def test_dr_takes_equal_numbers_per_image():
    out, y = _known_case(ce_id=(0.7, 0.7))  # equal ID costs: whichever ID patch is drawn, the loss is known
    parts = SSODLoss(balance='dr')(out, y, generator=torch.Generator().manual_seed(0))
    assert parts.loss.item() - parts.cls_loss.item() == pytest.approx((0.7 + 1.5) / 2, rel=1e-5)
    # the gradient touches exactly one of the two ID patches and the OOD patch
    parts.loss.backward()
    touched = (out.ood_map.grad.abs().sum(1) > 0).flatten().tolist()
    assert touched[2] and not touched[3] and sum(touched[:2]) == 1


@pytest.mark.parametrize('balance', ['lwb', 'lw', 'dr'])
@pytest.mark.parametrize('conf', [[[0.99, 0.98], [0.97, 0.5]],  # no OOD patches
                                  [[0.01, 0.02], [0.5, 0.5]],  # no ID patches
                                  [[0.5, 0.5], [0.5, 0.5]]])  # nothing sampled
def test_degenerate_batches_are_finite_with_the_right_gradient(balance, conf):
    cls_map = _two_class_map(conf)
    ood_map = torch.randn(1, 2, 2, 2, requires_grad=True)
    y = torch.tensor([0])
    parts = SSODLoss(balance=balance)(_spatial(cls_map, ood_map), y)
    assert torch.isfinite(parts.loss)
    parts.loss.backward()
    labels = sample_patches(cls_map, y)
    grad_at = ood_map.grad.abs().sum(1) > 0
    assert torch.isfinite(ood_map.grad).all()
    if balance == 'dr' or (labels == IGNORE).all():  # DR needs both kinds in an image
        assert not grad_at.any()
    else:
        assert torch.equal(grad_at, labels != IGNORE)
        # the present term alone: mean CE over its patches
        ce = F.cross_entropy(ood_map.detach(), labels.clamp(min=0), reduction='none')[labels != IGNORE].mean()
        assert parts.loss.item() - parts.cls_loss.item() == pytest.approx(ce.item(), rel=1e-5)


def _reference_lwb(cls_map, ood_map, y, gamma=0.95):
    """Eq. 12 + LWB with explicit loops."""
    ce_id, ce_ood = [], []
    for b in range(cls_map.shape[0]):
        p = cls_map[b].softmax(0)[y[b]]
        for i in range(cls_map.shape[2]):
            for j in range(cls_map.shape[3]):
                if p[i, j] >= gamma:
                    ce_id.append(F.cross_entropy(ood_map[b, :, i, j][None], torch.tensor([1])))
                elif p[i, j] < 1 - gamma:
                    ce_ood.append(F.cross_entropy(ood_map[b, :, i, j][None], torch.tensor([0])))
    return (torch.stack(ce_id).mean() + torch.stack(ce_ood).mean()) / 2


def test_lwb_matches_a_loop_reference_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    cls_map = torch.randn(3, 4, 5, 5, generator=g) * 6
    y = torch.tensor([0, 1, 3])
    ood_a = torch.randn(3, 2, 5, 5, generator=g, requires_grad=True)
    ood_b = ood_a.detach().clone().requires_grad_(True)
    parts = SSODLoss(alpha=1.0)(_spatial(cls_map, ood_a), y)
    (parts.loss - parts.cls_loss).backward()
    reference = _reference_lwb(cls_map, ood_b, y)
    reference.backward()
    assert (parts.loss - parts.cls_loss).item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(ood_a.grad, ood_b.grad)


@pytest.mark.parametrize('balance', ['lwb', 'lw', 'dr'])
def test_count_reducer_makes_two_ranks_equal_one_process(balance):
    """Two half-batches with globally reduced patch counts give the full batch's mean gradient (DDP), for every
    balance scheme (DR's per-image draws line up: the halves read the same generator stream as the full batch),
    in the OOD head and, through the exposure term, in the classifier's map."""
    g = torch.Generator().manual_seed(1)
    cls_map = torch.randn(4, 3, 4, 4, generator=g) * 6
    y = torch.tensor([0, 1, 2, 0])
    ood = torch.randn(4, 2, 4, 4, generator=g)
    full, full_cls = ood.clone().requires_grad_(True), cls_map.clone().requires_grad_(True)
    loss = SSODLoss(balance=balance, background_weight=2.0, exposure=0.5)
    parts = loss(_spatial(full_cls, full), y, generator=torch.Generator().manual_seed(0))
    (parts.loss - parts.cls_loss).backward()
    assert full_cls.grad.any()  # the exposure term reaches the classifier

    halves = [ood[:2].clone().requires_grad_(True), ood[2:].clone().requires_grad_(True)]
    cls_halves = [cls_map[:2].clone().requires_grad_(True), cls_map[2:].clone().requires_grad_(True)]
    draws = torch.Generator().manual_seed(0)
    kept = []
    for s in (slice(0, 2), slice(2, 4)):  # the patch counts each rank contributes, after DR's draw, and before it
        is_id, is_ood = sample_patches(cls_map[s], y[s]) == 1, sample_patches(cls_map[s], y[s]) == 0
        background = is_ood.sum()
        if balance == 'dr':
            is_id, is_ood = _resample_equal(is_id, is_ood, draws)
        kept.append(torch.stack([is_id.sum(), is_ood.sum(), background]).float())
    total = kept[0] + kept[1]
    draws = torch.Generator().manual_seed(0)
    for s, half, cls_half in zip((slice(0, 2), slice(2, 4)), halves, cls_halves):
        def reducer(counts, local=kept[s.start // 2]):  # what this rank sends is its own counts
            torch.testing.assert_close(counts, local)
            return total.clone()
        loss = SSODLoss(balance=balance, background_weight=2.0, exposure=0.5, count_reducer=reducer, world_size=2)
        parts = loss(_spatial(cls_half, half), y[s], generator=draws)
        (parts.loss - parts.cls_loss).backward()
    torch.testing.assert_close(torch.cat([h.grad for h in halves]) / 2, full.grad)  # DDP averages over ranks
    torch.testing.assert_close(torch.cat([h.grad for h in cls_halves]) / 2, full_cls.grad)


def test_warmup_trains_classification_only_but_keeps_the_head_in_the_graph():
    out, y = _known_case()
    parts = SSODLoss()(out, y, ood=False)
    assert parts.loss.item() == pytest.approx(parts.cls_loss.item())
    parts.loss.backward()
    assert out.ood_map.grad is not None and not out.ood_map.grad.any()


def test_bad_configuration():
    with pytest.raises(ValueError, match='balance must be one of'):
        SSODLoss(balance='focal')
    with pytest.raises(ValueError, match='gamma must be in'):
        SSODLoss(gamma=1.5)
    with pytest.raises(ValueError, match='alpha, background_weight and exposure must be finite and >= 0'):
        SSODLoss(alpha=-0.1)
    with pytest.raises(ValueError, match='exposure must be finite and >= 0, got 0.0, 1.0 and -1'):
        SSODLoss(alpha=0.0, exposure=-1)
    for weight in (math.inf, math.nan):
        with pytest.raises(ValueError, match=f'must be finite and >= 0, got 1.0, 1.0 and {weight}'):
            SSODLoss(exposure=weight)
    with pytest.raises(ValueError, match='world_size must be >= 1, got 0'):
        SSODLoss(world_size=0)
    with pytest.raises(ValueError, match="ood_rule must be one of .*'median'"):
        SSODLoss(ood_rule='median')


def test_wrong_inputs_say_what_to_pass():
    """What a timm training loop would hand the loss by habit: the model(x) output, Mixup's soft targets, float
    labels. Each gets one message that says what to pass, before any loss is computed."""
    import timm
    model = timm.create_model('ssod_test_resnet', num_classes=4)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    loss = SSODLoss()
    with pytest.raises(TypeError, match=r'takes the model\'s forward_spatial\(x\) output .*got SSODOutput: call '
                                        r'loss\(model.forward_spatial\(x\), target\)'):
        loss(model(x), y)
    spatial = model.forward_spatial(x)
    soft = F.one_hot(y, 4).float() * 0.9 + 0.025  # timm's Mixup with label smoothing
    with pytest.raises(TypeError, match=r"soft targets of shape \(2, 4\) \(timm's Mixup/CutMix\): mixup and cutmix "
                                        'are not supported'):
        loss(spatial, soft)
    with pytest.raises(TypeError, match=r'got torch.float32: pass target.long\(\)'):
        loss(spatial, y.float())
    assert torch.isfinite(loss(spatial, y).loss)


def test_label_smoothing_reaches_the_classification_loss():
    out, y = _known_case()
    parts = SSODLoss(label_smoothing=0.2)(out, y)
    # logits (2, 0), label 0, 2 classes: (1 - 0.2 + 0.1) * CE(label 0) + 0.1 * CE(label 1)
    log_p = torch.tensor([2.0, 0.0]).log_softmax(0)
    assert parts.cls_loss.item() == pytest.approx(-(0.9 * log_p[0] + 0.1 * log_p[1]).item(), rel=1e-6)


def test_the_chance_rule_reaches_the_sampler_through_the_loss():
    """3 classes, 10% on the label: ignored by the paper's rule (cutoff 0.05), OOD by 'chance' (0.5 / 3)."""
    p = torch.tensor([0.1, 0.45, 0.45]).log()
    cls_map = p.view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    cls_map[0, :, 0, 0] = torch.tensor([0.98, 0.01, 0.01]).log()  # one ID patch in both
    ood_map = torch.zeros(1, 2, 2, 2)
    y = torch.tensor([0])
    paper = SSODLoss()(_spatial(cls_map, ood_map), y)
    chance = SSODLoss(ood_rule='chance')(_spatial(cls_map, ood_map), y)
    assert [paper.frac_id.item(), paper.frac_ood.item()] == [0.25, 0.0]
    assert [chance.frac_id.item(), chance.frac_ood.item()] == [0.25, 0.75]


def test_a_patch_exactly_at_gamma_is_id():
    """Eq. 12's ID patches are those with confidence >= gamma: logits (100, 0) give softmax exactly 1.0."""
    cls_map = torch.tensor([100.0, 0.0]).view(1, 2, 1, 1)
    assert cls_map.softmax(1)[0, 0].item() == 1.0
    assert sample_patches(cls_map, torch.tensor([0]), gamma=1.0).item() == 1


def test_several_ranks_without_a_count_reducer_are_refused():
    """Each rank would divide by its own patch counts: the loss silently off by the number of ranks."""
    with pytest.raises(ValueError, match='count_reducer'):
        SSODLoss(world_size=2)
    SSODLoss(world_size=1)
