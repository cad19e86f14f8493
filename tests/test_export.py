"""Deployment paths of every registered SSOD model: ONNX, TorchScript, torch.compile, channels_last, bf16 autocast.

Each model gets non-trivial weights first (random BatchNorm statistics, heads scaled so logits are O(1) and
ood_factor sits inside (0, 1) rather than at 0.5 or saturated), so a wrong graph cannot pass by producing the
near-constant outputs of a freshly initialised network. Inputs are 64x64 (a 2x2 feature map at stride 32).

The Inductor tests are marked ``slow`` (30-60 s each on 2 CPU cores with a cold Inductor cache) and skipped
unless ``--runslow`` is given (tests/conftest.py).
"""
import copy
import functools
import json
import math
import sys

import pytest
import timm
import torch
from torch import nn

import ssod_zoo
from ssod_zoo import SSODOutput, SSODScores
from ssod_zoo.app.export import main
from ssod_zoo.export import INPUT_NAME, OUTPUT_NAMES, export_onnx

# resnet34 and resnet101 export through resnet18's and resnet50's graphs (same block types, more of them)
MODELS = [m for m in timm.list_models('ssod_*') if m not in ('ssod_resnet34', 'ssod_resnet101')]
SIZE = (3, 64, 64)
ONNX_ATOL = 1e-4  # the bar for ONNX vs PyTorch, on logits of magnitude ~1-4
COMPILE_MODELS = ['ssod_test_resnet', 'ssod_resnet18']

_models = {}


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """These tests are bound by Python-side tracing, not arithmetic (64x64, batch <= 3). One intra-op thread
    also spares them OpenMP's collapse on a shared machine: with 2 threads on 2 busy cores, a forward pass here
    took 10x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give a fresh model BatchNorm statistics worth folding and heads with O(1) outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        x = torch.randn(8, *SIZE, generator=g)
        pooled = model.eval().forward_head(model.forward_features(x), pre_logits=True)
        for head in (model.get_classifier(), model.ood_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 2.0
                              / (math.sqrt(head.in_features) * pooled.std()))
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) - head.weight @ pooled.mean(0))
    return model


def _varied_images(batch: int, seed: int) -> torch.Tensor:
    """Noise images whose contrast and colour differ per image: pooled features of i.i.d. noise barely differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SIZE, generator=g)
    return x * (torch.rand(batch, 1, 1, 1, generator=g) * 1.5 + 0.5) + torch.randn(batch, 3, 1, 1, generator=g)


@functools.lru_cache(maxsize=None)
def _input_sensitive(name: str) -> nn.Module:
    """A model whose outputs vary strongly across :func:`_varied_images`: BatchNorm statistics measured on
    images (so every layer passes a signal on), heads along the two main directions in which the pooled
    features vary across images, so ``ood_factor`` spreads over most of (0, 1). Built once per name and shared
    by the tests that read it (none modifies it)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration pass
        model.train()(torch.randn(16, *SIZE, generator=g))
        for m in bns:  # statistics that differ a little from any batch's, so eval mode is not train mode
            m.momentum = 0.1
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.05 * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.2 + 0.9)
        model.eval()
        pooled = model.forward_head(model.forward_features(_varied_images(16, seed=100)), pre_logits=True)
        mean = pooled.mean(0)
        _, s, v = torch.linalg.svd(pooled - mean, full_matrices=False)
        basis = v[:2] * (math.sqrt(pooled.shape[0] - 1) / s[:2]).unsqueeze(1)  # unit-variance projections
        for head in (model.get_classifier(), model.ood_head):
            weight = torch.randn(head.out_features, 2, generator=g) @ basis * 2.0
            head.weight.copy_(weight)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.5 - weight @ mean)
    return model


def _model(name: str, return_ood: bool = True) -> nn.Module:
    """One randomised eval-mode model per architecture, shared by the tests; ``return_ood=False`` shares its weights."""
    if name not in _models:
        torch.manual_seed(0)
        _models[name] = _randomize(timm.create_model(name).eval())
    model = _models[name]
    return model if return_ood else ssod_zoo.wrap(model, return_ood=False)


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *SIZE, generator=torch.Generator().manual_seed(seed))


def _reference(model: nn.Module, x: torch.Tensor) -> SSODScores:
    """What the exported graph computes, eagerly: ``forward_scores``, whose first two fields are ``forward_ssod``'s
    (compared separately in test_ssod_models); a comparison with the 2 outputs of ``forward_ssod`` checks those."""
    with torch.no_grad():
        return model.forward_scores(x)


def _assert_same(out, ref, atol: float, rtol: float = 0.0, outputs: int = len(OUTPUT_NAMES)) -> None:
    """The first ``outputs`` of OUTPUT_NAMES: ``out`` has exactly those (an output lost fails), ``ref`` at least."""
    assert len(out) == outputs and len(ref) >= outputs, f'{len(out)} outputs, {outputs} expected'
    for name, a, b in zip(OUTPUT_NAMES, out, ref):
        a = torch.as_tensor(a)
        assert a.shape == b.shape, f'{name}: shape {tuple(a.shape)} != {tuple(b.shape)}'
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f'{name}: {m}')


def _session(path):
    import onnxruntime as ort  # the [test] extra installs it: a missing one is a failure, not a skip
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


# ------------------------------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize('name', MODELS)
def test_onnx_matches_pytorch_with_dynamic_batch(name, tmp_path):
    # an input-sensitive model on varied images: the outputs must differ across images by far more than the
    # tolerance, or a graph that ignored its input (a constant ood_factor) would pass
    model = _input_sensitive(name)
    path = export_onnx(model, tmp_path / f'{name}.onnx', input_size=SIZE)  # batch_size 1: traced at 2
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in sess.get_outputs()] == ['logits', 'ood_factor', 'spatial_score']
    assert isinstance(sess.get_inputs()[0].shape[0], str), 'batch axis is not symbolic'
    for batch in (2, 3):
        x = _varied_images(batch, seed=batch)
        ref = _reference(model, x)
        out = sess.run(None, {INPUT_NAME: x.numpy()})
        for out_name, got, t in zip(OUTPUT_NAMES, out, ref):
            tol = ONNX_ATOL * max(1.0, t.abs().max().item())  # float32 rounding grows with the outputs' magnitude
            spread = (t.max(0).values - t.min(0).values).max().item()
            assert spread >= 100 * tol, f'{out_name} varies by only {spread:.2g} across the images (tol {tol:.1g})'
            torch.testing.assert_close(torch.as_tensor(got), t, atol=tol, rtol=0, msg=lambda m: f'{out_name}: {m}')


def test_a_dynamic_batch_is_traced_past_batch_1(tmp_path):
    """torch.export specialises an example dimension of 1 and then refuses to make it dynamic (ConvNeXt at 64 px:
    "Invalid ranges [2:1]"): the default --batch-size 1 traces at 2, and the graph takes 1 and 3 alike."""
    ssod_zoo.register('convnext_atto')
    model = timm.create_model('ssod_convnext_atto', num_classes=3).eval()
    sess = _session(export_onnx(model, tmp_path / 'cx.onnx', input_size=(3, 64, 64), batch_size=1))
    for batch in (1, 3):
        x = _images(batch)
        _assert_same(sess.run(None, {INPUT_NAME: x.numpy()}), _reference(model, x), atol=1e-4)


def test_onnx_export_is_eval_mode_whatever_the_model_mode(tmp_path):
    """A training-mode, return_ood=False model exports forward_ssod in eval mode and is left as it was."""
    model = _randomize(timm.create_model('ssod_test_resnet', return_ood=False, ood_threshold=0.25,
                                         spatial_threshold=-1.5, readout='factor')).train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    path = export_onnx(model, tmp_path / 'm.onnx', input_size=SIZE)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, stats), 'export updated BatchNorm statistics'
    x = _images(2)
    out = _session(path).run(None, {INPUT_NAME: x.numpy()})
    _assert_same(out, _reference(model.eval(), x), atol=ONNX_ATOL)

    import onnx
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert float(meta['ssod_zoo.ood_threshold']) == 0.25 and float(meta['ssod_zoo.spatial_threshold']) == -1.5
    assert meta['ssod_zoo.readout'] == 'ood_factor'  # the output to decide with, as the model's readout says
    assert meta['ssod_zoo.input_size'] == '[3, 64, 64]'
    assert meta['ssod_zoo.mean'] == '[0.485, 0.456, 0.406]' and meta['ssod_zoo.std'] == '[0.229, 0.224, 0.225]'
    assert (json.loads(meta['ssod_zoo.interpolation']), json.loads(meta['ssod_zoo.crop_pct'])) == (
        model.pretrained_cfg['interpolation'], model.pretrained_cfg['crop_pct'])


def test_onnx_old_opset(tmp_path):
    """Opsets below 18 (older runtimes) are written as asked, not silently raised to 18."""
    import onnx
    model = _model('ssod_test_resnet')
    path = export_onnx(model, tmp_path / 'm17.onnx', input_size=SIZE, opset=17)
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ('', 'ai.onnx')] == [17]
    x = _images(3)
    _assert_same(_session(path).run(None, {INPUT_NAME: x.numpy()}), _reference(model, x), atol=ONNX_ATOL)
    # and through the command's flag
    from ssod_zoo.app import export
    export.main(['ssod_test_resnet', '--out', str(tmp_path / 'cli17.onnx'), '--opset', '17',
                 '--input-size', *map(str, SIZE)])
    assert [o.version for o in onnx.load(str(tmp_path / 'cli17.onnx')).opset_import
            if o.domain in ('', 'ai.onnx')] == [17]


def test_onnx_cli_with_checkpoint(tmp_path, capsys):
    """`ssod export ARCH --checkpoint ...` loads the weights (class count read from them) and fixes the batch."""
    model = _randomize(timm.create_model('ssod_test_resnet', num_classes=7), seed=3).eval()
    torch.save(model.state_dict(), tmp_path / 'ckpt.pth')
    out = tmp_path / 'sub' / 'cli.onnx'
    assert main(['ssod_test_resnet', '--checkpoint', str(tmp_path / 'ckpt.pth'), '--out', str(out),
                 '--input-size', *map(str, SIZE), '--static-batch', '--batch-size', '2']) == 0
    assert 'logits (2, 7)' in capsys.readouterr().out
    sess = _session(out)
    assert sess.get_inputs()[0].shape == [2, *SIZE]
    x = _images(2)
    _assert_same(sess.run(None, {INPUT_NAME: x.numpy()}), _reference(model, x), atol=ONNX_ATOL)


def test_onnx_cli_with_training_checkpoint(tmp_path):
    """`ssod export CHECKPOINT` rebuilds a `ssod_zoo.app.train` checkpoint: architecture, weights and ood_threshold."""
    import onnx
    from ssod_zoo.hub import CHECKPOINT_FORMAT

    model = _randomize(timm.create_model('ssod_test_resnet', num_classes=5), seed=4).eval()
    torch.save({'format': CHECKPOINT_FORMAT, 'architecture': 'ssod_test_resnet', 'model_args': {'num_classes': 5},
                'model': model.state_dict(), 'ood_threshold': 0.375, 'spatial_threshold': 7.25,
                'data_config': {'input_size': list(SIZE)}}, tmp_path / 'best.pt')  # trained and calibrated at SIZE
    out = tmp_path / 'ckpt.onnx'
    assert main([str(tmp_path / 'best.pt'), '--out', str(out), '--input-size', *map(str, SIZE)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert float(meta['ssod_zoo.ood_threshold']) == 0.375 and meta['ssod_zoo.num_classes'] == '5'
    assert float(meta['ssod_zoo.spatial_threshold']) == 7.25
    x = _images(3)
    _assert_same(_session(out).run(None, {INPUT_NAME: x.numpy()}), _reference(model, x), atol=ONNX_ATOL)


@pytest.mark.parametrize('form', ['timm .pth', 'training checkpoint'])
def test_onnx_cli_refuses_a_class_count_the_weights_contradict(form, tmp_path):
    from ssod_zoo.hub import CHECKPOINT_FORMAT
    model = timm.create_model('ssod_test_resnet', num_classes=3)
    if form == 'timm .pth':
        torch.save(model.state_dict(), tmp_path / 'w.pth')
        argv = ['ssod_test_resnet', '--checkpoint', str(tmp_path / 'w.pth')]
    else:
        torch.save({'format': CHECKPOINT_FORMAT, 'architecture': 'ssod_test_resnet', 'model_args': {'num_classes': 3},
                    'model': model.state_dict()}, tmp_path / 'best.pt')
        argv = [str(tmp_path / 'best.pt')]
    with pytest.raises(SystemExit, match='has 3 classes, not --num-classes 5; .*leave --num-classes out'):
        main([*argv, '--num-classes', '5', '--out', str(tmp_path / 'x.onnx')])
    assert not (tmp_path / 'x.onnx').exists()


def test_onnx_cli_rejects_unknown_and_plain_models(tmp_path):
    with pytest.raises(SystemExit, match='unknown model'):
        main(['no_such_model', '--out', str(tmp_path / 'x.onnx')])
    with pytest.raises(SystemExit, match='not an SSOD model'):
        main(['test_resnet', '--out', str(tmp_path / 'x.onnx')])
    assert not (tmp_path / 'x.onnx').exists()


def test_onnx_export_needs_an_ssod_model(tmp_path):
    with pytest.raises(TypeError, match='needs an SSOD model'):
        export_onnx(timm.create_model('test_resnet'), tmp_path / 'x.onnx')


def test_onnx_export_names_the_extra_when_onnx_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnx', None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r"ssod_zoo\[export\]"):
        export_onnx(_model('ssod_test_resnet'), tmp_path / 'x.onnx')


# ------------------------------------------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize('return_ood', [True, False], ids=['ssod_output', 'logits'])
@pytest.mark.parametrize('name', MODELS)
def test_torchscript_matches_eager(name, return_ood):
    model = _model(name, return_ood)
    scripted = torch.jit.script(model)
    x = _images(2)
    with torch.no_grad():
        eager, out = model(x), scripted(x)
    if return_ood:
        # TorchScript rebuilds NamedTuples as its own class (torch._jit_internal.SSODOutput): same fields, same
        # unpacking and attribute access, but isinstance(out, ssod_zoo.SSODOutput) is False
        assert isinstance(eager, SSODOutput) and out._fields == SSODOutput._fields
        _assert_same((out.logits, out.ood_factor), eager, atol=1e-6, rtol=1e-6, outputs=2)
        _assert_same(scripted.forward_ssod(x), eager, atol=1e-6, rtol=1e-6, outputs=2)
    else:
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings('ignore:`torch.jit.(save|load)` is deprecated:FutureWarning')
def test_torchscript_save_load_round_trip(tmp_path):
    model = _model('ssod_test_resnet')
    torch.jit.save(torch.jit.script(model), tmp_path / 'm.pt')
    loaded = torch.jit.load(tmp_path / 'm.pt')
    x = _images(2)
    with torch.no_grad():
        logits, ood_factor = loaded(x)
    _assert_same((logits, ood_factor), _reference(model, x), atol=1e-6, rtol=1e-6, outputs=2)


# ---------------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize('return_ood', [True, False], ids=['ssod_output', 'logits'])
@pytest.mark.parametrize('name', COMPILE_MODELS)
def test_compile_fullgraph_has_no_graph_break(name, return_ood):
    """Dynamo captures the whole forward as one graph (fullgraph=True raises on any break). The eager backend
    keeps this fast; Inductor code generation is tested below, marked slow."""
    model = _model(name, return_ood)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    x = _images(2)
    with torch.no_grad():
        out, eager = compiled(x), model(x)
    if return_ood:
        assert isinstance(out, SSODOutput)
        _assert_same(out, eager, atol=1e-6, rtol=1e-6, outputs=2)
    else:
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)


def test_compile_fullgraph_of_a_cross_entropy_model():
    """A twin's untrained-head warning stays out of the compiled graph: forward and forward_ssod compile whole."""
    model = ssod_zoo.wrap(_model('ssod_test_resnet'), ood_head_trained=False)
    torch._dynamo.reset()
    x = _images(2)
    with torch.no_grad(), pytest.warns(ssod_zoo.UntrainedOODHeadWarning):  # eager, for the reference
        eager = model(x)
    with torch.no_grad():
        _assert_same(torch.compile(model, fullgraph=True, backend='eager')(x), eager, atol=1e-6, rtol=1e-6,
                     outputs=2)
        torch._dynamo.reset()
        _assert_same(torch.compile(model.forward_ssod, fullgraph=True, backend='eager')(x), eager, atol=1e-6,
                     rtol=1e-6, outputs=2)


@pytest.mark.slow
@pytest.mark.parametrize('return_ood', [True, False], ids=['ssod_output', 'logits'])
@pytest.mark.parametrize('name', COMPILE_MODELS)
def test_compile_inductor_matches_eager(name, return_ood):
    model = _model(name, return_ood)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # default backend: Inductor
    x = _images(2)
    with torch.no_grad():
        out, eager = compiled(x), model(x)
    if return_ood:
        assert isinstance(out, SSODOutput)
        _assert_same(out, eager, atol=1e-4, rtol=1e-4, outputs=2)
    else:
        torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- memory format and precision


@pytest.mark.parametrize('name', MODELS)
def test_channels_last_matches(name):
    model = _model(name)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert cl.get_classifier().weight.data_ptr() != model.get_classifier().weight.data_ptr()
    x = _images(2)
    with torch.no_grad():
        out = cl(x.contiguous(memory_format=torch.channels_last))
    _assert_same(out, _reference(model, x), atol=1e-4, rtol=1e-4, outputs=2)


BF16_OOD_ATOL = 0.01  # measured: at most 0.0043 (resnet50) over the registered models, torch 2.14 CPU


@pytest.mark.parametrize('name', MODELS)
def test_bf16_autocast_cpu(name):
    """Under CPU bf16 autocast the logits come back as bfloat16 (the classifier is a Linear, which autocast runs
    in bf16) and ood_factor as float32 (the sigmoid runs in float32, so it compares finely with a threshold near
    1); both stay close to fp32: logits within 10% of their largest magnitude (MobileNetV3 measured 8.6%, the
    others under 4%), ood_factor within BF16_OOD_ATOL, while it varies across the images by over 20 times that."""
    model = _input_sensitive(name)
    x = _varied_images(4, seed=1)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    ref = _reference(model, x)
    spread = (ref.ood_factor.max() - ref.ood_factor.min()).item()
    assert spread >= 20 * BF16_OOD_ATOL, f'ood_factor varies by only {spread:.3f} across the images'
    assert out.logits.dtype == torch.bfloat16 and out.ood_factor.dtype == torch.float32
    assert out.logits.shape == ref.logits.shape and out.ood_factor.shape == ref.ood_factor.shape
    scale = ref.logits.abs().max().item()
    assert (out.logits.float() - ref.logits).abs().max().item() <= 0.1 * scale
    assert (out.ood_factor - ref.ood_factor).abs().max().item() <= BF16_OOD_ATOL


def test_an_export_at_another_input_size_carries_no_thresholds(tmp_path):
    """Thresholds hold at the input size they were calibrated at: an export at another size warns and leaves them
    (and the readout) out of the metadata, as loading at another size drops them; at the weights' size they go in."""
    import onnx
    model = ssod_zoo.load_model('ssod_test_resnet.synthetic')  # calibrated at 96 px
    with pytest.warns(UserWarning, match=r"input size \(3, 64, 64\), and the weights' spatial_threshold and "
                                         r"ood_threshold were calibrated at \(3, 96, 96\).*carries none") as caught:
        path = export_onnx(model, tmp_path / 'at64.onnx', input_size=(3, 64, 64))
    assert caught[0].filename == __file__
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert not {'ssod_zoo.spatial_threshold', 'ssod_zoo.ood_threshold', 'ssod_zoo.readout'} & set(meta)
    assert meta['ssod_zoo.thresholds'].startswith('none: calibrated at input size [3, 96, 96]')
    from ssod_zoo.export import _metadata
    own = _metadata(model, (3, 96, 96))
    assert float(own['ssod_zoo.spatial_threshold']) == model.spatial_threshold and 'ssod_zoo.thresholds' not in own
    # thresholds set by hand are the caller's, for whatever size the caller calibrated at: kept, at any size; the
    # weights' own beside them still left out
    model.spatial_threshold = 4.5
    mixed = _metadata(model, (3, 64, 64))
    assert float(mixed['ssod_zoo.spatial_threshold']) == 4.5 and 'ssod_zoo.ood_threshold' not in mixed
    assert mixed['ssod_zoo.thresholds'].startswith('ood_threshold left out: calibrated at input size [3, 96, 96]')
    model.ood_threshold = 0.3
    assert float(_metadata(model, (3, 64, 64))['ssod_zoo.ood_threshold']) == 0.3
    # passed to create_model: the caller's too, and the weights' other one is left out
    given = timm.create_model('ssod_test_resnet.synthetic', pretrained=True, ood_threshold=0.3)
    mixed = _metadata(given, (3, 64, 64))
    assert float(mixed['ssod_zoo.ood_threshold']) == 0.3 and 'ssod_zoo.spatial_threshold' not in mixed
    fresh = timm.create_model('ssod_test_resnet', num_classes=3, spatial_threshold=2.0)  # its cfg says 160 px
    assert float(_metadata(fresh, (3, 64, 64))['ssod_zoo.spatial_threshold']) == 2.0
    # a training checkpoint records the size its run calibrated at: the same rule
    from ssod_zoo.hub import CHECKPOINT_FORMAT
    torch.save({'format': CHECKPOINT_FORMAT, 'architecture': 'ssod_test_resnet', 'model_args': {'num_classes': 3},
                'model': fresh.state_dict(), 'spatial_threshold': 2.0, 'data_config': {'input_size': [3, 96, 96]}},
               tmp_path / 'best.pt')
    assert 'ssod_zoo.spatial_threshold' not in _metadata(ssod_zoo.load_model(tmp_path / 'best.pt'), (3, 64, 64))
