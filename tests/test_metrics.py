"""OOD metrics: known answers on toy vectors, exact ties, scikit-learn as the oracle, streaming, and errors."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ssod_zoo.metrics import (OODMetrics, accuracy, aupr_in, aupr_out, auroc, fpr95_ood_positive, fpr_at_tpr,
                              ood_metrics)

KEYS = {'fpr95', 'auroc', 'aupr_in', 'aupr_out'}


def sklearn_metrics(id_scores, ood_scores, tpr=0.95):
    """The oracle: ID positive, accept score >= t, every distinct threshold kept."""
    id_scores, ood_scores = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        'fpr95': fpr[np.searchsorted(tpr_curve, tpr, side='left')],
        'auroc': roc_auc_score(y, s),
        'aupr_in': average_precision_score(y, s),
        'aupr_out': average_precision_score(1 - y, -s),
    }


def assert_metrics_close(got, want, tol=1e-12):
    assert set(got) == KEYS
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=tol), k


# ---------------------------------------------------------------- known answers

def test_perfect_separation():
    m = ood_metrics(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0, 2.0]))
    assert m == {'fpr95': 0.0, 'auroc': 1.0, 'aupr_in': 1.0, 'aupr_out': 1.0}


def test_reversed_separation():
    m = ood_metrics(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0, 4.0]))
    assert m['fpr95'] == 1.0
    assert m['auroc'] == 0.0
    # ID recall only arrives once all 3 OOD images are accepted: precision 1/4 then 2/5
    assert m['aupr_in'] == pytest.approx(0.5 * 1 / 4 + 0.5 * 2 / 5)


def test_all_scores_equal():
    m = ood_metrics(torch.ones(4), torch.ones(6))
    assert m['fpr95'] == 1.0
    assert m['auroc'] == 0.5
    assert m['aupr_in'] == pytest.approx(4 / 10)
    assert m['aupr_out'] == pytest.approx(6 / 10)


def test_ties_worked_by_hand():
    # distinct thresholds 0.9, 0.8, 0.5, 0.3, 0.2 accept (tp, fp) = (1,0) (3,1) (3,2) (4,2) (4,3)
    id_scores, ood_scores = [0.9, 0.8, 0.8, 0.3], [0.8, 0.5, 0.2]
    # TPR reaches 0.95 only at t=0.3 (TPR 1), where 2 of 3 OOD images are accepted
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(2 / 3)
    # pairs: 0.9 beats 3; each 0.8 beats 2 and ties 1 (1/2); 0.3 beats 1 -> 9 of 12
    assert auroc(id_scores, ood_scores) == pytest.approx(9 / 12)
    # recall steps 1/4, 1/2, 1/4 at precisions 1, 3/4, 4/6
    assert aupr_in(id_scores, ood_scores) == pytest.approx(1 / 4 + 1 / 2 * 3 / 4 + 1 / 4 * 4 / 6)
    # OOD positive on -score: thresholds 0.2, 0.3, 0.5, 0.8 give recall steps 1/3 at precisions 1, 2/3, 1/2
    assert aupr_out(id_scores, ood_scores) == pytest.approx(1 / 3 * (1 + 2 / 3 + 1 / 2))


def test_fpr95_threshold_accepts_exactly_95_percent():
    # 20 ID scores 1..20: t = 2 accepts 19/20 = 0.95 exactly, which counts (TPR >= 0.95), so t = 1 is not needed
    id_scores = torch.arange(1, 21, dtype=torch.float64)
    ood_scores = torch.tensor([1.5, 2.5, 30.0])
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(2 / 3)
    # asking for every ID image moves the threshold to 1 and accepts the third OOD image too
    assert fpr_at_tpr(id_scores, ood_scores, tpr=1.0) == 1.0
    # an OOD image tied with the threshold is accepted (score >= t)
    assert fpr_at_tpr(id_scores, torch.tensor([2.0, 1.9])) == 0.5


def test_fpr_at_tpr_is_monotone_in_tpr():
    g = torch.Generator().manual_seed(0)
    id_scores, ood_scores = torch.randn(200, generator=g) + 1, torch.randn(300, generator=g)
    fprs = [fpr_at_tpr(id_scores, ood_scores, t) for t in (0.1, 0.5, 0.8, 0.95, 1.0)]
    assert fprs == sorted(fprs)
    assert 0 < fprs[0] < fprs[-1] <= 1


def test_shift_and_scale_invariance_and_order():
    g = torch.Generator().manual_seed(1)
    id_scores, ood_scores = torch.randn(50, generator=g) + 0.5, torch.randn(70, generator=g)
    base = ood_metrics(id_scores, ood_scores)
    # only the order of the scores matters
    assert_metrics_close(ood_metrics(3 * id_scores - 7, 3 * ood_scores - 7), base)
    assert_metrics_close(ood_metrics(id_scores.flip(0), ood_scores[torch.randperm(70, generator=g)]), base)
    # swapping the roles of ID and OOD on negated scores swaps AUPR-IN and AUPR-OUT and keeps AUROC
    swapped = ood_metrics(-ood_scores, -id_scores)
    assert swapped['auroc'] == pytest.approx(base['auroc'])
    assert swapped['aupr_in'] == pytest.approx(base['aupr_out'])


def test_metrics_are_fractions_for_lists_numpy_and_any_dtype():
    want = ood_metrics(torch.tensor([0.9, 0.8, 0.8, 0.3]), torch.tensor([0.8, 0.5, 0.2]))
    assert_metrics_close(ood_metrics([0.9, 0.8, 0.8, 0.3], [0.8, 0.5, 0.2]), want)
    assert_metrics_close(ood_metrics(np.array([0.9, 0.8, 0.8, 0.3]), np.array([0.8, 0.5, 0.2])), want)
    # half precision keeps the ties: 0.8 stays tied with 0.8
    assert_metrics_close(ood_metrics(torch.tensor([0.9, 0.8, 0.8, 0.3], dtype=torch.float16),
                                     torch.tensor([0.8, 0.5, 0.2], dtype=torch.float16)), want)
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in want.values())


def test_list_scores_keep_float64_precision():
    # 1 + 1e-9 and 1 are distinct in float64 but equal in float32
    assert auroc([1 + 1e-9], [1.0]) == 1.0


# ---------------------------------------------------------------- scikit-learn as the oracle

@pytest.mark.parametrize('seed', [0, 1, 2, 3])
@pytest.mark.parametrize('n_id,n_ood', [(1, 1), (7, 3), (100, 250), (1000, 400)])
def test_agrees_with_sklearn_continuous(seed, n_id, n_ood):
    g = np.random.default_rng(seed)
    id_scores, ood_scores = g.normal(1.0, 1.0, n_id), g.normal(0.0, 1.5, n_ood)
    got = ood_metrics(torch.from_numpy(id_scores), torch.from_numpy(ood_scores))
    assert_metrics_close(got, sklearn_metrics(id_scores, ood_scores))


@pytest.mark.parametrize('seed', [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize('levels', [2, 3, 10])
def test_agrees_with_sklearn_heavily_tied(seed, levels):
    g = np.random.default_rng(seed)
    n_id, n_ood = g.integers(1, 300, size=2)
    id_scores = g.integers(0, levels, n_id).astype(np.float64) + (g.random() < 0.5)  # ID sometimes shifted up
    ood_scores = g.integers(0, levels, n_ood).astype(np.float64)
    got = ood_metrics(torch.from_numpy(id_scores), torch.from_numpy(ood_scores))
    assert_metrics_close(got, sklearn_metrics(id_scores, ood_scores))


@pytest.mark.parametrize('tpr', [0.05, 0.5, 0.9, 0.95, 0.99, 1.0])
def test_fpr_at_other_tpr_agrees_with_sklearn(tpr):
    g = np.random.default_rng(7)
    id_scores, ood_scores = g.integers(0, 20, 500).astype(float) + 3, g.integers(0, 20, 300).astype(float)
    want = sklearn_metrics(id_scores, ood_scores, tpr=tpr)['fpr95']
    assert fpr_at_tpr(torch.from_numpy(id_scores), torch.from_numpy(ood_scores), tpr) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize('tpr', [0.5, 0.95, 1.0])
def test_openoods_ood_positive_fpr_agrees_with_sklearn_at_any_tpr(tpr):
    """OpenOOD's convention, fpr[argmax(tpr >= t)] on roc_curve(is_ood, -score), on tied scores; and its range."""
    g = np.random.default_rng(8)
    id_scores, ood_scores = g.integers(0, 20, 400).astype(float) + 3, g.integers(0, 20, 300).astype(float)
    fpr, tprs, _ = roc_curve(np.r_[np.zeros(400), np.ones(300)], -np.r_[id_scores, ood_scores])
    got = fpr95_ood_positive(torch.from_numpy(id_scores), torch.from_numpy(ood_scores), tpr)
    assert got == pytest.approx(fpr[np.argmax(tprs >= tpr - 1e-12)], abs=1e-12)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r'tpr must be in \(0, 1\]'):
            fpr95_ood_positive(id_scores, ood_scores, bad)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=25), st.lists(st.integers(-3, 3), min_size=1, max_size=25))
def test_agrees_with_sklearn_on_small_tied_inputs(id_scores, ood_scores):
    got = ood_metrics(torch.tensor(id_scores, dtype=torch.float64), torch.tensor(ood_scores, dtype=torch.float64))
    assert_metrics_close(got, sklearn_metrics(id_scores, ood_scores))


def test_auroc_is_the_mann_whitney_statistic():
    g = torch.Generator().manual_seed(3)
    id_scores, ood_scores = torch.randint(0, 5, (40,), generator=g), torch.randint(0, 5, (30,), generator=g)
    diff = id_scores[:, None] - ood_scores[None, :]
    want = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()
    assert auroc(id_scores, ood_scores) == pytest.approx(float(want), abs=1e-12)


# ---------------------------------------------------------------- streaming

def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(4)
    id_scores = torch.randint(0, 8, (137,), generator=g).float() + 1
    ood_scores = torch.randint(0, 8, (91,), generator=g).float()
    want = ood_metrics(id_scores, ood_scores)

    m = OODMetrics()
    # ID-only batches with a python bool, OOD-only batches with a bool tensor, and mixed batches
    m.update(id_scores[:50], is_id=True)
    m.update(ood_scores[:40], is_id=torch.zeros(40, dtype=torch.bool))
    mixed = torch.cat([id_scores[50:], ood_scores[40:]])
    flags = torch.cat([torch.ones(87, dtype=torch.bool), torch.zeros(51, dtype=torch.bool)])
    perm = torch.randperm(mixed.numel(), generator=g)
    for chunk in perm.split(17):
        m.update(mixed[chunk], flags[chunk])
    m.update(torch.empty(0), is_id=True)  # an empty batch is harmless
    assert_metrics_close(m.compute(), want)
    assert_metrics_close(m.compute(), want)  # compute() does not consume the state


def test_streaming_reset_and_zero_dim_flag():
    m = OODMetrics()
    m.update(torch.tensor([9.0, 9.0]), is_id=False)  # would ruin the metrics if reset() kept it
    m.reset()
    m.update(torch.tensor([3.0, 4.0]), is_id=torch.tensor(True))
    m.update(torch.tensor([1.0, 2.0]), is_id=torch.tensor(False))
    assert m.compute() == {'fpr95': 0.0, 'auroc': 1.0, 'aupr_in': 1.0, 'aupr_out': 1.0}
    assert 'n_id=2' in repr(m)


def test_streaming_detaches_grad_scores():
    scores = torch.tensor([1.0, 2.0, 0.0], requires_grad=True)
    m = OODMetrics()
    m.update(scores * 2, torch.tensor([True, True, False]))
    assert not any(t.requires_grad for t in m._id + m._ood)  # no autograd graph kept alive by the stored scores
    assert m.compute()['auroc'] == 1.0


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_scores_raise(bad):
    with pytest.raises(ValueError, match='NaN/Inf.*id_scores|id_scores.*NaN/Inf'):
        ood_metrics(torch.tensor([1.0, bad]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match='ood_scores has 1 NaN/Inf'):
        auroc(torch.tensor([1.0]), torch.tensor([0.0, bad]))
    with pytest.raises(ValueError, match='NaN/Inf'):
        OODMetrics().update(torch.tensor([bad]), is_id=True)


@pytest.mark.parametrize('fn', [fpr_at_tpr, auroc, aupr_in, aupr_out, ood_metrics])
def test_empty_or_single_class_raises(fn):
    with pytest.raises(ValueError, match='ood_scores is empty'):
        fn(torch.tensor([1.0, 2.0]), torch.tensor([]))
    with pytest.raises(ValueError, match='id_scores is empty'):
        fn([], [1.0])


def test_streaming_single_class_raises_with_counts():
    m = OODMetrics()
    with pytest.raises(ValueError, match='0 ID and 0 OOD'):
        m.compute()
    m.update(torch.randn(5), is_id=True)
    with pytest.raises(ValueError, match='5 ID and 0 OOD.*is_id=False'):
        m.compute()


def test_bad_shapes_and_flags_raise():
    with pytest.raises(ValueError, match=r'\(N,\).*energy'):
        auroc(torch.randn(4, 3), torch.randn(4))
    with pytest.raises(ValueError, match='tpr must be in'):
        fpr_at_tpr([1.0], [0.0], tpr=95)
    with pytest.raises(ValueError, match='tpr must be in'):
        fpr_at_tpr([1.0], [0.0], tpr=0.0)
    m = OODMetrics()
    with pytest.raises(ValueError, match='is_id has shape'):
        m.update(torch.randn(4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match='bool'):
        m.update(torch.randn(4), torch.tensor([0, 1, 2, 3]))  # class labels are not ID flags


# ---------------------------------------------------------------- accuracy

def test_accuracy_known_value():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 2])) == 0.5
    assert accuracy(logits, torch.tensor([0, 1, 2, 0])) == 1.0


def test_accuracy_errors():
    with pytest.raises(ValueError, match=r'logits \(B, M\) and targets \(B,\)'):
        accuracy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match='argmax'):
        accuracy(torch.randn(4, 3), torch.zeros(4, 3))  # one-hot floats
    with pytest.raises(ValueError, match='argmax'):
        accuracy(torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='empty'):
        accuracy(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------- devices

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_scores_match_cpu():
    g = torch.Generator().manual_seed(5)
    id_scores, ood_scores = torch.randint(0, 6, (300,), generator=g).float(), torch.randn(200, generator=g)
    streaming = OODMetrics()
    streaming.update(id_scores.cuda(), True)
    streaming.update(ood_scores.cuda(), False)
    assert_metrics_close(streaming.compute(), ood_metrics(id_scores, ood_scores))
    assert_metrics_close(ood_metrics(id_scores.cuda(), ood_scores), ood_metrics(id_scores, ood_scores))


def test_roc_curve_matches_sklearn_and_the_scalar_metrics():
    from sklearn.metrics import roc_curve as sk_roc_curve
    from ssod_zoo.metrics import roc_curve
    g = torch.Generator().manual_seed(3)
    id_s, ood_s = torch.randint(0, 20, (200,), generator=g).double(), torch.randint(0, 15, (150,), generator=g).double()
    fpr, tpr = roc_curve(id_s, ood_s)
    y = np.r_[np.ones(200), np.zeros(150)]
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, np.r_[id_s.numpy(), ood_s.numpy()], drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), sk_fpr)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr)
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(auroc(id_s, ood_s))
