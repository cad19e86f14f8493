"""Post-hoc OOD scores: known values, direct formulas as oracles, chunking, gradients, and errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from ssod_zoo.scores import KNN, Mahalanobis, ReAct, ViM, _percentile, _vim_dim, energy, max_logit, msp, odin


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- pure functions

def test_msp_known_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert torch.allclose(msp(logits), torch.tensor([0.5, 0.75]))
    assert torch.allclose(msp(torch.zeros(3, 4)), torch.full((3,), 0.25))
    # invariant to a shift of all logits, unlike max_logit and energy
    assert torch.allclose(msp(randn(5, 7) + 10), msp(randn(5, 7)))


def test_max_logit_known_values():
    logits = torch.tensor([[1.0, -2.0, 3.5], [0.0, -1.0, -0.5]])
    assert torch.equal(max_logit(logits), torch.tensor([3.5, 0.0]))


def test_energy_is_temperature_logsumexp():
    logits = randn(6, 10, seed=1) * 4
    assert torch.allclose(energy(logits), torch.logsumexp(logits, dim=1))
    assert torch.allclose(energy(logits, temperature=2.5), 2.5 * torch.logsumexp(logits / 2.5, dim=1))
    # M equal logits: log M; and energy moves one-for-one with a shift of the logits
    assert torch.allclose(energy(torch.zeros(2, 8)), torch.full((2,), math.log(8)))
    assert torch.allclose(energy(logits + 3), energy(logits) + 3)
    # T -> 0 approaches the max logit from above
    assert torch.allclose(energy(logits, temperature=1e-3), max_logit(logits), atol=1e-2)
    assert (energy(logits) >= max_logit(logits)).all()


def test_scores_rank_a_confident_image_above_a_flat_one():
    logits = torch.tensor([[8.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    for fn in (msp, max_logit, energy):
        s = fn(logits)
        assert s.shape == (2,) and s[0] > s[1], fn.__name__


def test_pure_scores_follow_the_input_dtype():
    for fn in (msp, max_logit, energy):
        assert fn(randn(3, 4, dtype=torch.float64)).dtype == torch.float64
        assert fn(randn(3, 4)).dtype == torch.float32
        # half logits are upcast: logsumexp in float16 overflows past 11
        half = torch.full((1, 4), 30000.0, dtype=torch.float16)
        assert fn(half).dtype == torch.float32 and torch.isfinite(fn(half)).all()


def test_pure_scores_reject_bad_shapes():
    for fn in (msp, max_logit, energy):
        with pytest.raises(ValueError, match=r'\(B, M\)'):
            fn(torch.randn(5))
    with pytest.raises(ValueError, match='temperature'):
        energy(torch.randn(2, 3), temperature=0.0)


# ---------------------------------------------------------------- ODIN

def linear_model(seed=0, d=6, m=4):
    torch.manual_seed(seed)
    return nn.Linear(d, m).eval()


def odin_by_hand(model, x, t, eps, std=1.0):
    """x~ = x - eps * sign(grad_x CE(f(x)/T, argmax)) / std; for a linear f the gradient is
    W^T (softmax(f(x)/T) - y) / T."""
    with torch.no_grad():
        z = model(x) / t
        p = z.softmax(1)
        y = nn.functional.one_hot(z.argmax(1), z.shape[1]).to(p)
        grad = (p - y) @ model.weight / t
        x_tilde = x - eps * grad.sign() / torch.as_tensor(std)
        return (model(x_tilde) / t).softmax(1).amax(1)


@pytest.mark.parametrize('t,eps', [(1000.0, 0.0014), (1.0, 0.05), (10.0, 0.0)])
def test_odin_matches_the_formula(t, eps):
    model = linear_model()
    x = randn(8, 6, seed=2)
    got = odin(model, x, temperature=t, epsilon=eps)
    assert got.shape == (8,) and not got.requires_grad
    assert torch.allclose(got, odin_by_hand(model, x, t, eps), rtol=0, atol=1e-6)


def test_odin_with_the_normalisation_std_steps_in_pixel_units():
    """The paper's code and OpenOOD divide the step by the std the images were normalised with: epsilon is in units
    of pixel values, and each channel of the normalised input moves by epsilon / std."""
    model, x = linear_model(4), randn(8, 6, seed=6)
    std = [0.229, 0.224, 0.225, 0.5, 1.0, 2.0]
    got = odin(model, x, temperature=1000.0, epsilon=0.05, std=std)
    assert torch.allclose(got, odin_by_hand(model, x, 1000.0, 0.05, std), rtol=0, atol=1e-6)
    assert not torch.allclose(got, odin(model, x, temperature=1000.0, epsilon=0.05), rtol=0, atol=1e-6)
    for bad in ([0.2] * 5, [0.2] * 5 + [0.0]):
        with pytest.raises(ValueError, match='one positive value per channel of x \\(6\\)'):
            odin(model, x, std=bad)


def test_odin_without_perturbation_is_temperature_scaled_msp():
    model, x = linear_model(1), randn(5, 6, seed=3)
    assert torch.allclose(odin(model, x, temperature=7.0, epsilon=0.0), msp(model(x).detach() / 7.0))


def test_odin_step_raises_the_score_and_uses_the_gradient():
    model, x = linear_model(2), randn(16, 6, seed=4)
    plain = odin(model, x, temperature=1.0, epsilon=0.0)
    stepped = odin(model, x, temperature=1.0, epsilon=0.01)
    against = odin(model, x, temperature=1.0, epsilon=-0.01)  # the opposite step lowers it
    assert torch.isfinite(stepped).all()
    assert (stepped > plain).all() and (against < plain).all()


def test_odin_leaves_no_grad_and_works_under_no_grad_and_inference_mode():
    model, x = linear_model(3), randn(4, 6, seed=5)
    want = odin(model, x, temperature=1.0, epsilon=0.01)
    with torch.no_grad():
        under_no_grad = odin(model, x, temperature=1.0, epsilon=0.01)
    with torch.inference_mode():
        x_inf = x.clone()
        under_inference = odin(model, x_inf, temperature=1.0, epsilon=0.01)
    assert torch.allclose(under_no_grad, want) and torch.allclose(under_inference, want)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert x.grad is None and not x.requires_grad


def test_odin_errors():
    x = randn(3, 6)
    model = linear_model()

    def no_grad_fn(images):
        with torch.no_grad():
            return model(images)

    with pytest.raises(RuntimeError, match='does not require grad'):
        odin(no_grad_fn, x)
    with pytest.raises(ValueError, match=r'\(3, M\)'):
        odin(lambda images: model(images).flatten(), x)
    with pytest.raises(ValueError, match='temperature'):
        odin(model, x, temperature=-1.0)


# ---------------------------------------------------------------- ReAct

def test_react_threshold_is_the_numpy_percentile():
    feats = randn(50, 9, seed=6).relu()
    for p in (0.0, 37.5, 90.0, 100.0):
        assert ReAct(p).fit(feats).c == pytest.approx(np.percentile(feats.numpy(), p), rel=1e-6)


PERCENTILE_CASES = {
    'normal': randn(3000, seed=30),
    'relu': randn(3000, seed=31).relu(),  # half the activations tied at 0
    'few_levels': torch.randint(0, 4, (3000,), generator=torch.Generator().manual_seed(32)).float(),
    'constant': torch.full((500,), 2.5),
    # neighbouring float64 values, and a range too narrow for float64 buckets
    'adjacent': torch.tensor([1.0, math.nextafter(1.0, 2.0)] * 300, dtype=torch.float64),
    'denormal': torch.tensor([5e-324, 1e-323, 1.5e-323] * 200, dtype=torch.float64),
    'half': randn(2000, seed=33).half(),
}


@pytest.mark.parametrize('case', sorted(PERCENTILE_CASES))
@pytest.mark.parametrize('chunk_size', [5, 64, 1 << 22])
def test_percentile_is_numpys_in_bounded_memory(case, chunk_size):
    # small chunks force the bucket-narrowing selection that ReAct uses on 100k x 2048 activations
    x = PERCENTILE_CASES[case]
    for q in (0.0, 1.0, 37.5, 50.0, 90.0, 99.9, 100.0):
        want = np.percentile(x.double().numpy(), q)
        assert _percentile(x, q, chunk_size) == pytest.approx(want, rel=1e-12, abs=0), (case, q)


def test_react_is_energy_of_the_clipped_features():
    feats = randn(40, 8, seed=7).relu() * 3
    head = nn.Linear(8, 5)
    react = ReAct(percentile=90.0).fit(feats)
    queries = randn(6, 8, seed=8).relu() * 3
    with torch.no_grad():
        want = torch.logsumexp(head(queries.clamp(max=react.c)), dim=1)
        got = react(queries, head.weight, head.bias)
    assert torch.allclose(got, want)
    # at the 100th percentile nothing in the fit set is clipped, so ReAct is plain energy there
    react_max = ReAct(100.0).fit(feats)
    with torch.no_grad():
        assert torch.allclose(react_max(feats, head.weight, head.bias), energy(head(feats)))


def test_react_activation_above_c_does_not_change_the_score():
    feats = randn(40, 8, seed=9).relu()
    head = nn.Linear(8, 5)
    react = ReAct().fit(feats)
    x = torch.full((1, 8), react.c / 2)
    base = react(x, head.weight.detach(), head.bias.detach())
    above = x.clone()
    above[0, 3] = react.c * 10
    at_c = x.clone()
    at_c[0, 3] = react.c
    assert torch.allclose(react(above, head.weight, head.bias), react(at_c, head.weight, head.bias))
    assert not torch.allclose(react(at_c, head.weight, head.bias), base)  # below c the feature counts
    assert react(x, head.weight, None).shape == (1,)


def test_react_errors():
    head = nn.Linear(8, 5)
    with pytest.raises(RuntimeError, match='not fitted'):
        ReAct()(randn(2, 8), head.weight, head.bias)
    react = ReAct().fit(randn(10, 8))
    with pytest.raises(ValueError, match='fitted on 8'):
        react(randn(2, 7), head.weight, head.bias)
    with pytest.raises(ValueError, match=r'weight must be .*\(M, 8\)'):
        react(randn(2, 8), head.weight.T, head.bias)
    with pytest.raises(ValueError, match=r'bias must be \(5,\)'):
        react(randn(2, 8), head.weight, torch.zeros(4))
    with pytest.raises(ValueError, match='pool them first'):
        ReAct().fit(randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match='percentile'):
        ReAct(percentile=150)


# ---------------------------------------------------------------- KNN

def knn_brute_force(bank, queries, k):
    bank = nn.functional.normalize(bank.double(), dim=1)
    queries = nn.functional.normalize(queries.double(), dim=1)
    dist = torch.cdist(queries, bank)
    return -dist.sort(dim=1).values[:, k - 1]


@pytest.mark.parametrize('chunk_size', [1, 3, 7, 40, 4096])
@pytest.mark.parametrize('k', [1, 5])
def test_knn_matches_brute_force_for_any_chunking(chunk_size, k):
    bank, queries = randn(40, 6, seed=10), randn(23, 6, seed=11) * 2
    got = KNN(k=k, chunk_size=chunk_size).fit(bank)(queries)
    assert got.shape == (23,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), knn_brute_force(bank, queries, k), atol=1e-5)


def test_knn_known_value_and_self_match():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # the 2nd nearest unit vector to (1, 0) is (0, 1) at distance sqrt(2); scale does not matter
    assert KNN(k=2).fit(bank * 5)(torch.tensor([[3.0, 0.0]])).item() == pytest.approx(-math.sqrt(2))
    # k=1 on the training set finds each image itself
    assert torch.allclose(KNN(k=1).fit(bank)(bank), torch.zeros(3), atol=1e-3)


def test_knn_dtype_and_empty_batch():
    bank, queries = randn(30, 4, seed=12, dtype=torch.float64), randn(5, 4, seed=13, dtype=torch.float64)
    knn = KNN(k=3, chunk_size=4).fit(bank)
    assert knn.bank.dtype == torch.float64 and knn(queries).dtype == torch.float64
    assert torch.allclose(knn(queries), knn_brute_force(bank, queries, 3), atol=1e-12)
    half = KNN(k=3).fit(bank.half())
    assert half.bank.dtype == torch.float16  # the bank may be kept in half precision to save memory
    assert torch.allclose(half(queries.float()).double(), knn_brute_force(bank, queries, 3), atol=5e-3)
    assert knn(torch.empty(0, 4, dtype=torch.float64)).shape == (0,)


def test_knn_errors():
    with pytest.raises(RuntimeError, match='not fitted'):
        KNN()(randn(2, 4))
    with pytest.raises(ValueError, match='at least k'):
        KNN(k=50).fit(randn(10, 4))
    with pytest.raises(ValueError, match='fitted on 4'):
        KNN(k=2).fit(randn(10, 4))(randn(2, 5))
    with pytest.raises(ValueError, match='NaN'):
        KNN(k=1).fit(torch.tensor([[1.0, float('nan')]]))
    with pytest.raises(ValueError, match='chunk_size'):
        KNN(chunk_size=0)


# ---------------------------------------------------------------- Mahalanobis

def mahalanobis_direct(feats, labels, queries, pinv=False):
    feats, queries = feats.double(), queries.double()
    classes = labels.unique()
    means = torch.stack([feats[labels == c].mean(0) for c in classes])
    centred = feats - means[torch.searchsorted(classes, labels)]
    cov = centred.T @ centred / feats.shape[0]
    precision = torch.linalg.pinv(cov, hermitian=True) if pinv else torch.linalg.inv(cov)
    d = torch.stack([torch.einsum('bi,ij,bj->b', queries - mu, precision, queries - mu) for mu in means], dim=1)
    return -d.min(dim=1).values


@pytest.mark.parametrize('chunk_size', [5, 4096])
def test_mahalanobis_matches_the_direct_formula(chunk_size):
    labels = torch.arange(120) % 3
    feats = randn(120, 5, seed=14) + labels[:, None].float() * 2
    queries = randn(11, 5, seed=15) * 3
    det = Mahalanobis(chunk_size=chunk_size).fit(feats, labels)
    got = det(queries)
    assert got.shape == (11,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), mahalanobis_direct(feats, labels, queries), rtol=1e-4, atol=1e-4)
    assert torch.equal(det.classes, torch.tensor([0, 1, 2]))


def test_mahalanobis_singular_covariance_and_missing_classes():
    # fewer images than dimensions, and labels 1 and 4 only: pseudo-inverse, two class means
    labels = torch.tensor([1, 4] * 4)
    feats = randn(8, 12, seed=16, dtype=torch.float64)
    queries = randn(3, 12, seed=17, dtype=torch.float64)
    det = Mahalanobis().fit(feats, labels)
    assert torch.equal(det.classes, torch.tensor([1, 4]))
    got = det(queries)
    assert got.dtype == torch.float64
    assert torch.allclose(got, mahalanobis_direct(feats, labels, queries, pinv=True), rtol=1e-8, atol=1e-8)


def test_mahalanobis_training_points_score_higher_than_far_points():
    labels = torch.arange(60) % 2
    feats = randn(60, 3, seed=18) + labels[:, None].float() * 4
    det = Mahalanobis().fit(feats, labels)
    assert det(feats).mean() > det(feats + 20).mean()
    assert (det(feats) <= 0).all()


def test_mahalanobis_errors():
    with pytest.raises(RuntimeError, match='not fitted'):
        Mahalanobis()(randn(2, 4))
    with pytest.raises(ValueError, match='labels must be a'):
        Mahalanobis().fit(randn(10, 4), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match='integer class'):
        Mahalanobis().fit(randn(10, 4), torch.zeros(10))
    with pytest.raises(ValueError, match='fitted on 4'):
        Mahalanobis().fit(randn(10, 4), torch.arange(10) % 2)(randn(2, 3))


# ---------------------------------------------------------------- ViM

def vim_direct(feats, weight, bias, queries, query_logits, dim):
    """The official ViM recipe, in numpy."""
    x, w, b = feats.double().numpy(), weight.double().numpy(), bias.double().numpy()
    u = -np.linalg.pinv(w) @ b
    cov = (x - u).T @ (x - u) / len(x)
    eig_vals, eig_vecs = np.linalg.eigh(cov)
    ns = eig_vecs[:, np.argsort(-eig_vals)[dim:]]
    alpha = (x @ w.T + b).max(axis=1).mean() / np.linalg.norm((x - u) @ ns, axis=1).mean()
    q, ql = queries.double().numpy(), query_logits.double().numpy()
    lse = np.log(np.exp(ql - ql.max(1, keepdims=True)).sum(1)) + ql.max(1)
    return torch.from_numpy(lse - alpha * np.linalg.norm((q - u) @ ns, axis=1)), alpha


@pytest.mark.parametrize('chunk_size', [7, 4096])
def test_vim_matches_the_direct_formula(chunk_size):
    feats = randn(200, 16, seed=19).relu() + randn(200, 16, seed=20) * 0.1
    head = nn.Linear(16, 6)
    queries = randn(9, 16, seed=21).relu() * 2
    with torch.no_grad():
        query_logits = head(queries)
        vim = ViM(dim=5, chunk_size=chunk_size).fit(feats, head.weight, head.bias)
        want, alpha = vim_direct(feats, head.weight, head.bias, queries, query_logits, dim=5)
        got = vim(queries, query_logits)
    assert vim.principal_dim == 5 and vim.alpha == pytest.approx(alpha, rel=1e-9)
    assert got.shape == (9,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)


def test_vim_default_dim_follows_the_paper():
    assert [_vim_dim(d) for d in (4096, 2048, 1024, 768, 512, 10)] == [1000, 1000, 512, 512, 256, 5]
    feats = randn(50, 10, seed=22)
    assert ViM().fit(feats, randn(3, 10), randn(3)).principal_dim == 5


def test_vim_without_bias_uses_the_origin_and_a_residual_lowers_the_score():
    feats = randn(100, 6, seed=23) * 0.01
    feats[:, :3] = randn(100, 3, seed=23)  # ID features live (almost) in the first 3 dimensions
    weight = randn(4, 6, seed=24)
    vim = ViM(dim=3).fit(feats, weight)
    assert torch.equal(vim.u, torch.zeros(6, dtype=torch.float64))
    x = feats[:2].clone()
    off = x.clone()
    off[:, 5] = 4.0  # same logits, but a component outside the principal subspace
    logits = x @ weight.T
    assert (vim(off, logits) < vim(x, logits)).all()


def test_vim_errors():
    head = nn.Linear(8, 3)
    with pytest.raises(RuntimeError, match='not fitted'):
        ViM()(randn(2, 8), randn(2, 3))
    with pytest.raises(ValueError, match='dim < D'):
        ViM(dim=8).fit(randn(20, 8), head.weight, head.bias)
    flat = torch.zeros(20, 8)
    flat[:, 0] = randn(20)  # every feature on one line through the origin: no residual, alpha undefined
    with pytest.raises(ValueError, match=r'they span 1 dimensions about u, dim is 1\).*fit on more, varied images'):
        ViM(dim=1).fit(flat, head.weight)
    flat[:, 1] = torch.arange(20.0)  # a plane: a smaller dim leaves a residual, and the error says which
    with pytest.raises(ValueError, match=r'they span 2 dimensions about u, dim is 2\).*use a smaller dim \(below 2\)'):
        ViM(dim=2).fit(flat, head.weight)
    vim = ViM(dim=2).fit(randn(20, 8), head.weight, head.bias)
    with pytest.raises(ValueError, match='3-class'):
        vim(randn(2, 8), randn(2, 4))
    with pytest.raises(ValueError, match=r'\(2, M\)'):
        vim(randn(2, 8), randn(3, 3))
    with pytest.raises(ValueError, match='fitted on 8'):
        vim(randn(2, 9), randn(2, 3))


# ---------------------------------------------------------------- devices

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_fitted_scores_follow_the_query_device():
    labels = torch.arange(100) % 4
    feats, queries = randn(100, 8, seed=25), randn(10, 8, seed=26)
    head = nn.Linear(8, 4)
    w, b = head.weight.detach(), head.bias.detach()
    cases = [
        (KNN(k=3, chunk_size=7).fit(feats), lambda d, q: d(q)),
        (Mahalanobis().fit(feats, labels), lambda d, q: d(q)),
        (ViM(dim=4).fit(feats, w, b), lambda d, q: d(q, q @ w.T.to(q) + b.to(q))),
        (ReAct().fit(feats), lambda d, q: d(q, w, b)),
    ]
    for det, score in cases:
        cpu, gpu = score(det, queries), score(det, queries.cuda())
        assert gpu.device.type == 'cuda', type(det).__name__
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-4), type(det).__name__
