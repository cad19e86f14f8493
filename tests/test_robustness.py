"""Property-based tests: whatever the shapes, dtypes and values, a clear error or a documented result."""
import math

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ssod_zoo  # noqa: F401
from ssod_zoo.loss import IGNORE, SSODLoss, sample_patches
from ssod_zoo.metrics import ood_metrics
from ssod_zoo.output import SpatialOutput

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope='module')
def model():
    return timm.create_model('ssod_test_resnet', num_classes=4).eval()


@SETTINGS
@given(batch=st.integers(1, 3), h=st.integers(1, 80), w=st.integers(1, 80),
       channels=st.sampled_from([1, 3, 4]), ndim=st.sampled_from([3, 4, 5]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.uint8, torch.int64]),
       special=st.sampled_from([None, math.nan, math.inf, -math.inf]))
def test_model_forward_gives_outputs_or_a_clear_error(model, batch, h, w, channels, ndim, dtype, special):
    shape = {3: (channels, h, w), 4: (batch, channels, h, w), 5: (1, batch, channels, h, w)}[ndim]
    x = (torch.rand(shape) * 255).to(dtype)
    if special is not None and dtype.is_floating_point:
        x.view(-1)[0] = special
    valid = (ndim == 4 and channels == 3 and dtype == torch.float32 and min(h, w) >= 32
             and (special is None))
    if valid:
        with torch.no_grad():
            out = model(x)
        assert out.logits.shape == (batch, 4) and torch.isfinite(out.logits).all()
        assert ((out.ood_factor >= 0) & (out.ood_factor <= 1)).all()
    else:
        with pytest.raises((TypeError, ValueError)) as e:
            model(x)
        assert type(model).__name__ in str(e.value)  # our message, not one from deep inside torch


@SETTINGS
@given(b=st.integers(1, 4), m=st.integers(2, 6), h=st.integers(1, 5), w=st.integers(1, 5),
       scale=st.sampled_from([0.0, 1.0, 10.0, 1e4]), gamma=st.floats(0.51, 1.0),
       balance=st.sampled_from(['lwb', 'lw', 'dr']), seed=st.integers(0, 2**16))
def test_sampler_and_loss_are_finite_and_consistent(b, m, h, w, scale, gamma, balance, seed):
    g = torch.Generator().manual_seed(seed)
    cls_map = torch.randn(b, m, h, w, generator=g) * scale
    target = torch.randint(0, m, (b,), generator=g)
    labels = sample_patches(cls_map, target, gamma)
    assert set(labels.unique().tolist()) <= {IGNORE, 0, 1}
    conf = cls_map.softmax(1).gather(1, target.view(b, 1, 1, 1).expand(b, 1, h, w)).squeeze(1)
    # both ways: every patch at or above gamma is ID, every one below 1 - gamma OOD, the rest ignored
    expected_labels = torch.where(conf >= gamma, 1, torch.where(conf < 1 - gamma, 0, IGNORE))
    assert torch.equal(labels, expected_labels)
    ood_map = torch.randn(b, 2, h, w, generator=g, requires_grad=True)
    out = SpatialOutput(torch.zeros(b, 1, h, w), torch.randn(b, m, generator=g), torch.zeros(b, 2), cls_map, ood_map)
    parts = SSODLoss(gamma=gamma, balance=balance)(out, target, generator=g)
    assert torch.isfinite(parts.loss)
    parts.loss.backward()
    assert torch.isfinite(ood_map.grad).all()
    # the logged fractions are those of the sampler's labels (recomputed here, not summed to 1 by construction)
    expected = [(labels == v).float().mean().item() for v in (1, 0, IGNORE)]
    assert [float(parts.frac_id), float(parts.frac_ood), float(parts.frac_ignored)] == pytest.approx(expected)


def test_sampler_ignores_positions_whose_map_is_nan():
    """As sample_patches documents: a NaN confidence is neither >= gamma nor below the cutoff, so the position
    trains nothing (the training loop's own NaN check stops a diverged run)."""
    cls_map = torch.zeros(1, 3, 2, 2)
    cls_map[0, 0] = 10.0  # confident on the label: ID
    cls_map[0, 0, 0, 0] = math.nan
    labels = sample_patches(cls_map, torch.tensor([0]))
    assert labels[0, 0, 0] == IGNORE and (labels.flatten()[1:] != IGNORE).all()


@SETTINGS
@given(n_id=st.integers(0, 20), n_ood=st.integers(0, 20), levels=st.integers(1, 4),
       special=st.sampled_from([None, math.nan, math.inf]))
def test_metrics_on_degenerate_inputs(n_id, n_ood, levels, special):
    g = torch.Generator().manual_seed(n_id * 31 + n_ood)
    id_s = torch.randint(0, levels, (n_id,), generator=g).double()
    ood_s = torch.randint(0, levels, (n_ood,), generator=g).double()
    if special is not None and n_id:
        id_s[0] = special
    if n_id == 0 or n_ood == 0 or (special is not None and n_id):
        with pytest.raises(ValueError):
            ood_metrics(id_s, ood_s)
        return
    r = ood_metrics(id_s, ood_s)
    assert all(0.0 <= v <= 1.0 for v in r.values())
    if levels == 1:  # all scores equal: chance
        assert r['auroc'] == pytest.approx(0.5) and r['fpr95'] == 1.0


def test_training_is_deterministic(tmp_path):
    """Two CPU runs of the same short training with the same seed give identical weights."""
    from ssod_zoo.app.synthetic import BenchmarkConfig, SyntheticBenchmark
    from ssod_zoo.app.train import main
    bench = SyntheticBenchmark(tmp_path / 'bench', BenchmarkConfig(
        num_classes=2, image_size=64, train_per_class=8, val_per_class=2, ood_per_set=2)).prepare(progress=False)
    states = []
    for run in ('a', 'b'):
        r = main(['--model', 'ssod_test_resnet', '--data', 'folder', '--train-dir', str(bench.root / 'id' / 'train'),
                  '--val-dir', str(bench.root / 'id' / 'val'), '--img-size', '64', '--batch-size', '8',
                  '--epochs', '1', '--workers', '2', '--lr', '1e-2', '--out-dir', str(tmp_path / run),
                  '--no-progress'])
        states.append(r['model'].state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
