"""The SSOD model family: registry, output contract, identity with timm, adapter, errors."""
import json
import warnings

import pytest
import timm
import torch

import ssod_zoo
from ssod_zoo import SSODOutput, UntrainedOODHeadWarning, robust_posterior, wrap

SSOD_MODELS = timm.list_models('ssod_*')
REQUIRED = ['ssod_resnet18', 'ssod_resnet34', 'ssod_resnet50', 'ssod_resnet101', 'ssod_densenet121',
            'ssod_regnety_008', 'ssod_mobilenetv3_large_100']
# architectures outside the registry the adapter must handle too (EfficientNet: head conv before pooling;
# ConvNeXt: norm after pooling)
EXTRA_TRUNKS = ['efficientnet_b0', 'convnext_tiny']
# resnet34 and resnet101 run resnet18's and resnet50's code (same block types, more of them): forward-pass tests
# take one of each; registration, config and meta-device tests still cover every registered name
DISTINCT_MODELS = [m for m in SSOD_MODELS if m not in ('ssod_resnet34', 'ssod_resnet101')]


def _trunk_name(ssod_name: str) -> str:
    return ssod_name[len('ssod_'):]


def _input(model, batch=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.in_chans, size, size, generator=g)


@pytest.fixture(scope='module', params=DISTINCT_MODELS + EXTRA_TRUNKS)
def pair(request):
    """(ssod model, plain timm model with the same weights), both in eval mode."""
    name = request.param
    torch.manual_seed(0)
    if name.startswith('ssod_'):
        ssod = timm.create_model(name, num_classes=7).eval()
        plain = timm.create_model(_trunk_name(name), num_classes=7).eval()
        plain.load_state_dict({k: v for k, v in ssod.state_dict().items() if not k.startswith('ood_head.')})
    else:
        plain = timm.create_model(name, num_classes=7).eval()
        ssod = wrap(plain)
    return ssod, plain


def test_registry_lists_every_architecture():
    assert set(REQUIRED) <= set(SSOD_MODELS)


@pytest.mark.parametrize('name', SSOD_MODELS)
def test_pretrained_cfg_is_complete_and_matches_timm(name):
    cfg = timm.create_model(name, device='meta').pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier',
                'license', 'paper_ids', 'num_classes', 'pool_size'):
        assert cfg.get(key) is not None, f'{name} pretrained_cfg lacks {key}'
    trunk_cfg = timm.get_pretrained_cfg(_trunk_name(name)).to_dict()
    assert (cfg['first_conv'], cfg['classifier']) == (trunk_cfg['first_conv'], trunk_cfg['classifier'])
    assert cfg['architecture'] == name


def test_output_contract(pair):
    ssod, _ = pair
    x = _input(ssod)
    with torch.no_grad():
        out = ssod(x)
    assert isinstance(out, SSODOutput)
    logits, p_id = out  # unpacks like a tuple
    assert logits.shape == (2, 7) and p_id.shape == (2,)
    assert out.logits is logits and out.ood_factor is p_id
    assert ((p_id >= 0) & (p_id <= 1)).all()


def test_logits_identical_to_timm(pair):
    ssod, plain = pair
    x = _input(ssod)
    with torch.no_grad():
        assert torch.equal(ssod(x).logits, plain(x))  # bit for bit: one pass of the head serves both outputs
        assert torch.equal(ssod.forward_spatial(x).logits, plain(x))


def test_logits_mode_is_a_drop_in_and_ood_stays_reachable(pair):
    ssod, plain = pair
    logits_only = wrap(ssod, return_ood=False)
    x = _input(ssod)
    with torch.no_grad():
        out = logits_only(x)
        both = logits_only.forward_ssod(x)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, plain(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(both.ood_factor, ssod(x).ood_factor)


def test_spatial_head_is_the_pooled_head_at_each_position(pair):
    """cls_map[..., i, j] is the model's own head (whatever sits after pooling) on feature position (i, j)."""
    ssod, _ = pair
    x = _input(ssod, size=96)
    with torch.no_grad():
        sp = ssod.forward_spatial(x)
        b, c, h, w = sp.features.shape
        assert sp.cls_map.shape == (b, 7, h, w) and sp.ood_map.shape == (b, 2, h, w)
        assert sp.ood_logits.shape == (b, 2)
        torch.testing.assert_close(sp.logits, ssod(x).logits)
        for i, j in [(0, 0), (h - 1, w - 1), (h // 2, w // 3)]:
            cell = sp.features[:, :, i:i + 1, j:j + 1]
            torch.testing.assert_close(sp.cls_map[:, :, i, j], ssod.forward_head(cell), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                sp.ood_map[:, :, i, j], ssod.ood_head(ssod.forward_head(cell, pre_logits=True)),
                rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['ssod_resnet18', 'ssod_densenet121', 'ssod_regnety_008'])
def test_pooled_ood_logits_are_the_mean_of_the_ood_map_when_pre_logits_is_pooling(name):
    """Eq. 15 vs Eq. 13: with a linear OOD head on GAP features, f_ood(GAP(X)) = GAP(f_ood(X))."""
    m = timm.create_model(name, num_classes=5).eval()
    with torch.no_grad():
        sp = m.forward_spatial(_input(m, size=96))
    torch.testing.assert_close(sp.ood_logits, sp.ood_map.mean((2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', DISTINCT_MODELS)
def test_every_parameter_gets_a_gradient_from_both_outputs(name):
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=5).train()
    with torch.no_grad():  # timm zero-initialises the last BatchNorm scale of each block, which blocks gradients
        for module in m.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
    out = m(_input(m, batch=2, size=64))

    def nonzero_grads():
        return {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    everything = {n for n, _ in m.named_parameters()}
    out.logits.logsumexp(1).mean().backward(retain_graph=True)
    assert everything - nonzero_grads() == {'ood_head.weight', 'ood_head.bias'}
    m.zero_grad(set_to_none=True)
    out.ood_factor.mean().backward()
    # the OOD factor trains the head and, through the pooled features, the whole backbone; not the classifier
    classifier = {n for n in everything if n.startswith(m.pretrained_cfg['classifier'] + '.')}
    assert everything - nonzero_grads() == classifier


def test_state_dict_keeps_timm_keys_and_timm_checkpoints_load(pair):
    ssod, plain = pair
    keys = set(ssod.state_dict())
    assert keys - set(plain.state_dict()) == {'ood_head.weight', 'ood_head.bias'}
    fresh = wrap(plain.pretrained_cfg['architecture'], num_classes=7)
    head_before = fresh.ood_head.weight.clone()
    assert fresh.ood_head_trained
    with pytest.warns(UserWarning, match='without an OOD head') as caught:
        result = fresh.load_state_dict(plain.state_dict())
    assert caught[0].filename == __file__  # at the caller's line
    assert result.missing_keys == [] and result.unexpected_keys == []  # strict: loaded, not refused
    assert torch.equal(fresh.ood_head.weight, head_before)  # the OOD head starts fresh
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    # a cross-entropy classifier now, and it says so: its OOD factor is no score
    assert not fresh.ood_head_trained and torch.isnan(fresh.forward_scores(_input(fresh)).ood_factor).all()
    # non-strict loading reports the OOD head missing, as it is (timm's own non-strict loaders read missing_keys)
    other = wrap(plain.pretrained_cfg['architecture'], num_classes=7)
    with pytest.warns(UserWarning, match='without an OOD head'):
        result = other.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ['ood_head.weight', 'ood_head.bias'] and result.unexpected_keys == []


def test_wrap_of_a_pretrained_name_says_its_ood_head_is_untrained(tmp_path):
    """timm's pretrained weights have no OOD head: wrap('<name>', pretrained=True) is a trained classifier with a
    fresh head, and says so; a name without weights and an instance (whose history wrap cannot see) are taken as
    they are."""
    weights = tmp_path / 'plain.pth'
    torch.save(timm.create_model('test_resnet', num_classes=3).state_dict(), weights)
    trained = wrap('test_resnet', pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(weights)))
    assert not trained.ood_head_trained
    assert wrap('test_resnet', num_classes=3).ood_head_trained
    assert wrap(timm.create_model('test_resnet', num_classes=3)).ood_head_trained
    # an SSOD weight's head was trained, and an SSOD model keeps its own say
    assert wrap('ssod_test_resnet.synthetic', pretrained=True).ood_head_trained
    assert not wrap(wrap('test_resnet', num_classes=3, ood_head_trained=False)).ood_head_trained


def test_ssod_checkpoint_round_trip_is_exact_and_silent():
    a = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    b = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        b.load_state_dict(a.state_dict())
    x = _input(a)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize('name', SSOD_MODELS)
def test_meta_device_creation(name):
    m = timm.create_model(name, device='meta')
    assert {p.device.type for p in m.parameters()} == {'meta'}
    assert m.ood_head.weight.device.type == 'meta'


def test_reset_classifier_keeps_ood_head_in_step_with_pre_logits():
    m = timm.create_model('ssod_test_resnet', num_classes=3)
    m.reset_classifier(5)
    assert m.num_classes == 5 and m.ood_head.in_features == m.head_hidden_size
    m.reset_classifier(5, 'catavgmax')  # doubles the pooled width
    assert m.ood_head.in_features == m.head_hidden_size == 2 * m.num_features
    assert not m.ood_head_trained  # a new head, and the model says so
    with pytest.warns(UntrainedOODHeadWarning):
        out = m.eval()(_input(m))
    assert out.logits.shape == (2, 5) and out.ood_factor.shape == (2,)


def test_reset_classifier_passes_the_trunks_own_arguments():
    """ConvNeXt's reset_other (timm's pruning and feature code passes it) resets the head's norm: the pooled
    features change, so the OOD threshold goes, as for another pooling; without it the threshold stays."""
    ssod_zoo.register('convnext_atto')
    m = timm.create_model('ssod_convnext_atto', num_classes=3, ood_threshold=0.4)
    m.reset_classifier(5)
    assert m.ood_threshold == 0.4 and not isinstance(m.head.norm, torch.nn.Identity)
    m.reset_classifier(5, reset_other=True)
    assert isinstance(m.head.norm, torch.nn.Identity) and m.ood_threshold is None
    assert m.ood_head.in_features == m.head_hidden_size and m.eval()(_input(m)).logits.shape == (2, 5)


# built in, and registered: ConvNeXt has 4 levels (not timm's default 5) and a reset_classifier(reset_other=...)
@pytest.mark.parametrize('name', ['ssod_resnet18', 'ssod_mobilenetv3_large_100', 'ssod_convnext_atto'])
def test_features_only_gives_the_trunk_pyramid(name):
    """Same feature maps, bit for bit, as timm's own features_only model of the trunk with the same weights."""
    ssod_zoo.register(_trunk_name(name))
    torch.manual_seed(0)
    m = timm.create_model(name, features_only=True).eval()
    plain = timm.create_model(_trunk_name(name), features_only=True).eval()
    state = {k.removeprefix('model.'): v for k, v in m.state_dict().items()}  # a getter wraps the model
    missing, _ = plain.load_state_dict(state, strict=False)
    assert not missing
    assert m.feature_info.channels() == plain.feature_info.channels()
    assert m.feature_info.reduction() == plain.feature_info.reduction()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, expected = m(x), plain(x)
    assert len(feats) == len(expected) == len(plain.feature_info.channels())
    for a, b in zip(feats, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize('name', ['ssod_resnet18', 'ssod_mobilenetv3_large_100', 'ssod_convnext_atto'])
def test_prune_intermediate_layers_as_timm(name):
    """timm's prune_intermediate_layers: with prune_head=False the model keeps its logits and OOD factor; with the
    head pruned (timm's default) the drop-in mode gives timm's own output, bit for bit, and SSOD's forward says what
    to do instead of failing on a shape."""
    ssod_zoo.register(_trunk_name(name))
    torch.manual_seed(0)
    ssod = timm.create_model(name, num_classes=7).eval()
    plain = timm.create_model(_trunk_name(name), num_classes=7).eval()
    plain.load_state_dict({k: v for k, v in ssod.state_dict().items() if not k.startswith('ood_head.')})
    drop_in = timm.create_model(name, num_classes=7, return_ood=False).eval()
    drop_in.load_state_dict(ssod.state_dict())
    x = _input(ssod)
    with torch.no_grad():
        expected = ssod(x)
        assert ssod.prune_intermediate_layers(indices=1, prune_head=False) == plain.prune_intermediate_layers(
            indices=1, prune_head=False)
        kept = ssod(x)
        assert torch.equal(kept.logits, expected.logits) and torch.equal(kept.ood_factor, expected.ood_factor)
        for model in (ssod, plain, drop_in):
            model.prune_intermediate_layers(indices=1)  # prune_head=True, timm's default
        with pytest.raises(RuntimeError, match=r'prune_intermediate_layers\(\) leave it.*prune with prune_head=False'):
            ssod(x)
        assert torch.equal(drop_in(x), plain(x))


def test_features_only_of_a_published_weight_carries_its_trunk():
    """pretrained=True with features_only: the weights' trunk and model arguments (output_stride=16 here), as the
    full model's forward_intermediates gives them."""
    full = timm.create_model('ssod_resnet18.fmnist', pretrained=True).eval()
    features = timm.create_model('ssod_resnet18.fmnist', pretrained=True, features_only=True, out_indices=(2, 4))
    x = _input(full)
    with torch.no_grad():
        got = features.eval()(x)
        expected = full.forward_intermediates(x, indices=(2, 4), intermediates_only=True)
    assert features.feature_info.reduction() == [8, 16] and len(got) == 2
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert 'state_dict' not in features.pretrained_cfg  # the weights went into the model, not its config
    json.dumps(features.pretrained_cfg)
    # timm's own feature arguments reach the trunk's extractor, as for the plain model
    hooked = timm.create_model('ssod_resnet18', features_only=True, feature_cfg=dict(feature_cls='hook'),
                               out_indices=(1,))
    assert type(hooked).__name__ == 'FeatureHookNet' and hooked.feature_info.out_indices == (1,)


@pytest.mark.parametrize('name', ['ssod_resnet18', 'ssod_mobilenetv3_large_100'])
def test_fx_feature_extraction_in_the_default_mode(name):
    """timm's (torch.fx) create_feature_extractor traces the SSOD forward too, not only the drop-in mode: the
    input and pooling checks step aside for a symbolic tensor."""
    from timm.models import create_feature_extractor
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).eval()
    node = {'ssod_resnet18': 'layer3', 'ssod_mobilenetv3_large_100': 'blocks.4'}[name]
    extractor = create_feature_extractor(model, return_nodes={node: 'f'})
    x = _input(model)
    with torch.no_grad():
        got = extractor(x)['f']
        expected = dict(model.named_modules())[node]
        seen = {}
        handle = expected.register_forward_hook(lambda m, i, o: seen.setdefault('f', o))
        model(x)
        handle.remove()
    assert torch.equal(got, seen['f'])


def test_wrap_shares_weights_and_leaves_the_original_alone():
    plain = timm.create_model('resnet18', num_classes=3).eval()
    x = _input(plain)
    with torch.no_grad():
        before = plain(x)
    ssod = wrap(plain)
    assert not hasattr(plain, 'ood_head') and 'ood_head' not in dict(plain.named_children())
    assert ssod.fc.weight is plain.fc.weight
    assert isinstance(ssod, timm.models.ResNet) and isinstance(ssod, ssod_zoo.SSODModel)
    with torch.no_grad():
        assert isinstance(plain(x), torch.Tensor)
        torch.testing.assert_close(plain(x), before)


def test_wrap_by_name_with_model_arguments():
    m = wrap('efficientnet_b0', num_classes=4, return_ood=False)
    assert m.num_classes == 4 and m.return_ood is False


def test_wrap_takes_a_model_built_on_the_meta_device():
    meta = timm.create_model('test_efficientnet', num_classes=3, device='meta')
    assert wrap(meta).ood_head.weight.device.type == 'meta'


def test_wrap_rejects_what_it_cannot_adapt():
    with pytest.raises(TypeError, match='not a timm classifier'):
        wrap(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match='only when the model is given by name'):
        wrap(timm.create_model('resnet18'), num_classes=3)
    with pytest.raises(TypeError, match=r'not a CNN.*tokens'):  # at wrap time, not deep inside training
        wrap('test_vit', num_classes=3)


@pytest.mark.parametrize('x, error, match', [
    (torch.randn(2, 1, 64, 64), ValueError, r"expects 3-channel images, got 1 .*convert\('RGB'\).*in_chans=1"),
    (torch.randn(2, 64, 64, 3), ValueError, r'looks like \(B, H, W, C\).*x\.permute\(0, 3, 1, 2\)'),
    (torch.randn(2, 3, 16, 16), ValueError, 'total stride of 32'),
    (torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), TypeError, 'floating-point'),
    (torch.randn(3, 64, 64), ValueError, r'x\.unsqueeze\(0\)'),
])
@pytest.mark.parametrize('method', ['forward', 'forward_ssod', 'forward_spatial'])
def test_bad_input_gets_a_clear_error(x, error, match, method):
    m = timm.create_model('ssod_resnet18', num_classes=3).eval()
    with pytest.raises(error, match=match):
        getattr(m, method)(x)


def test_scoring_in_training_mode_warns_and_says_to_call_eval():
    """timm.create_model returns a model in train mode: scores taken without a gradient there are a missing
    model.eval() (BatchNorm reads the batch, and updates its statistics as it scores); with a gradient (training)
    and in eval mode, nothing is said."""
    m = timm.create_model('ssod_test_resnet', num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    for method in ('forward_scores', 'spatial_score'):
        with torch.no_grad(), pytest.warns(UserWarning, match=f'{method}: the model is in training mode.*call '
                                                              r'model\.eval\(\) first') as caught:
            getattr(m, method)(x)
        assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        m.spatial_score(x)
        with torch.no_grad():
            m.eval().forward_scores(x)


@pytest.mark.parametrize('name', ['ssod_test_resnet', 'ssod_mobilenetv3_large_100'])
def test_an_empty_batch_gives_empty_outputs_on_every_path(name):
    """As model(x) does, every scoring path returns empty outputs of the right shape for a batch of 0 (a filtered
    batch in a pipeline); the per-position paths used to fail reshaping the maps."""
    m = timm.create_model(name, num_classes=4).eval()
    x = torch.randn(0, 3, 64, 64)
    with torch.no_grad():
        assert [t.shape for t in m.forward_scores(x)] == [(0, 4), (0,), (0,)]
        assert m.spatial_score(x).shape == (0,) and m(x).logits.shape == (0, 4)
        cls_map, ood_map = m.forward_positions(m.forward_features(x))
        spatial = m.forward_spatial(x)
    assert cls_map.shape[:2] == (0, 4) and ood_map.shape[:2] == (0, 2) and spatial.cls_map.shape == cls_map.shape


def test_drop_in_mode_takes_an_input_smaller_than_the_stride_as_timm_does():
    """return_ood=False is the plain timm model: an input the SSOD outputs refuse (no feature-map position of its
    own) gives timm's logits, as it does for the plain model."""
    torch.manual_seed(0)
    plain = timm.create_model('resnet18', num_classes=3).eval()
    dropin = wrap(plain, return_ood=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dropin(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='total stride of 32'):
        dropin.forward_ssod(x)


def test_pretrained_without_weights_says_what_to_do():
    with pytest.raises(RuntimeError, match=r'ssod_resnet50 has no SSOD weights; none are published for '
                                           r'ssod_resnet50 \(timm.list_pretrained.*--init resnet50.<tag>'):
        timm.create_model('ssod_resnet50', pretrained=True)


def test_tensor_code_on_the_ssod_output_is_told_what_to_do():
    """Code written for a tensor output (timm's train.py calls output.log_softmax) gets an error that names
    output.logits and return_ood=False; other missing names get Python's own message."""
    out = timm.create_model('ssod_test_resnet', num_classes=3).eval()(_input(timm.create_model('ssod_test_resnet')))
    with pytest.raises(AttributeError, match=r"no tensor method 'log_softmax'.*output\.logits.*"
                                             r"--model-kwargs return_ood=False"):
        out.log_softmax(-1)
    with pytest.raises(AttributeError, match=r"^'SSODOutput' object has no attribute 'nope'$"):
        out.nope
    assert not hasattr(out, 'shape') and out.logits.shape == (2, 3)


def test_robust_posterior():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p_id = torch.tensor([0.9, 0.25])
    post = robust_posterior(logits, p_id)
    assert post.shape == (2, 4)
    torch.testing.assert_close(post.sum(1), torch.ones(2))
    torch.testing.assert_close(post[:, -1], 1 - p_id)
    torch.testing.assert_close(post[1, :3], torch.full((3,), 0.25 / 3))
    torch.testing.assert_close(post[0, :3] / post[0, :3].sum(), logits[0].softmax(0))
    with pytest.raises(ValueError, match=r'ood_factor \(B,\)'):
        robust_posterior(logits, p_id[:1])


@pytest.mark.parametrize('make', ['ssod_test_resnet', 'wrap:test_efficientnet'])
def test_whole_model_pickle_loads_in_a_fresh_interpreter(make, tmp_path):
    """torch.save(model) / multiprocessing spawn / Ray pickle the whole model: SSOD<Arch> must resolve by name."""
    import subprocess
    import sys
    torch.manual_seed(0)
    if make.startswith('wrap:'):
        model = wrap(timm.create_model(make[5:], num_classes=3)).eval()
    else:
        model = timm.create_model(make, num_classes=3).eval()
    x = _input(model, size=64)
    with torch.no_grad():
        logits, ood = model(x)
    torch.save({'model': model, 'x': x, 'logits': logits, 'ood': ood}, tmp_path / 'whole.pt')
    code = ('import sys, torch; d = torch.load(sys.argv[1], weights_only=False); m = d["model"]\n'
            'with torch.no_grad(): logits, ood = m(d["x"])\n'
            'assert torch.equal(logits, d["logits"]) and torch.equal(ood, d["ood"])\n'
            'import ssod_zoo.adapter as a; assert getattr(a, type(m).__name__) is type(m)\n'
            'assert isinstance(m, ssod_zoo.SSODModel)\n'
            'print(type(m).__name__)')
    code = 'import ssod_zoo\n' + code if make.startswith('wrap:') else code.replace('ssod_zoo.SSODModel', 'a.SSODModel')
    r = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'whole.pt')], capture_output=True, text=True,
                       env={**__import__('os').environ, 'SSOD_ZOO_AUTOLOAD': '0'})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == type(model).__name__


def test_default_forward_checks_the_input_once(monkeypatch):
    """Each check is a pass over the input and a device sync on GPU: once per call, not once per layer of API."""
    m = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    calls = []
    original = type(m)._check_input
    monkeypatch.setattr(type(m), '_check_input',
                        lambda self, x, **kwargs: (calls.append(1), original(self, x, **kwargs))[1])
    with torch.no_grad():
        m(_input(m))
        assert len(calls) == 1
        m.forward_ssod(_input(m))
        assert len(calls) == 2


@pytest.mark.parametrize('method', ['forward', 'forward_spatial'])
def test_mobilenetv3_runs_its_head_conv_once_per_pooled_output(method):
    """MobileNetV3 pools before conv_head: the logits and the OOD head share one pass of it."""
    m = timm.create_model('ssod_mobilenetv3_large_100', num_classes=5).eval()
    shapes = []
    m.conv_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    x = _input(m, size=64)
    with torch.no_grad():
        getattr(m, method)(x)
    pooled = [s for s in shapes if s[0] == x.shape[0] and s[2:] == (1, 1)]
    assert len(pooled) == 1, shapes
    # forward_spatial's pass over every position is one matrix product with conv_head's weight, not the module
    assert shapes == [(x.shape[0], 960, 1, 1)], shapes


def test_ood_factor_difference_is_taken_in_float32_under_autocast():
    """bf16 would round the difference of the two OOD logits before the float32 sigmoid."""
    m = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    with torch.no_grad():
        m.ood_head.weight.zero_()
        m.ood_head.bias.copy_(torch.tensor([3 * 2.0 ** -8, 1.5]))  # both exact in bf16; their difference is not
        pooled = torch.zeros(1, m.head_hidden_size)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            p = m.forward_ood(pooled)
    assert p.dtype == torch.float32
    assert torch.equal(p, torch.sigmoid(torch.tensor([1.5 - 3 * 2.0 ** -8])))


def test_scores_under_autocast_are_the_float32_heads_on_the_features():
    """Under autocast the backbone runs in bf16, but the OOD head and the per-position classifier behind
    ``ood_factor`` and ``spatial_score`` run in float32, as the evaluation that calibrates their thresholds runs
    them (``collect``): a bf16 head would round the scores compared with those thresholds."""
    torch.manual_seed(0)
    m = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        scores, spatial = m.forward_scores(x), m.spatial_score(x)
        features = m.forward_features(x)
        pooled = m.forward_head(features, pre_logits=True)
    assert features.dtype == torch.bfloat16
    with torch.no_grad():
        ood_logits = m.ood_head(pooled.float())
        factor = torch.sigmoid(ood_logits[:, 1] - ood_logits[:, 0])
        top3 = ssod_zoo.spatial_maxlogit_score(m.forward_positions(features.float())[0])
    assert torch.equal(scores.ood_factor, factor)
    assert torch.equal(scores.spatial_score, top3) and torch.equal(spatial, top3)


def test_mobilenetv3_per_position_head_on_the_whole_map_is_the_head_at_each_position():
    """The one-convolution path equals forward_head on each position as a 1x1 map, dropout masks included."""
    m = timm.create_model('ssod_mobilenetv3_large_100', num_classes=5, drop_rate=0.3).train()
    features = torch.randn(2, m.num_features, 3, 3)
    torch.manual_seed(1)
    cls_map, ood_map = m.forward_positions(features)
    torch.manual_seed(1)
    positions = features.permute(0, 2, 3, 1).reshape(18, -1, 1, 1)
    pre_logits = m.forward_head(positions, pre_logits=True)
    as_map = lambda t: t.reshape(2, 3, 3, -1).permute(0, 3, 1, 2)  # noqa: E731
    torch.testing.assert_close(cls_map, as_map(m.get_classifier()(pre_logits)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ood_map, as_map(m.ood_head(pre_logits)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('trunk, kwargs', [('mobilenetv3_small_050', {'head_norm': True}), ('efficientvit_b0', {}),
                                           ('repvit_m0_9', {})])
def test_a_batchnorm_head_keeps_the_pooled_statistics_in_training(trunk, kwargs):
    """BatchNorm in the head (MobileNetV4's norm_head, EfficientViT's head conv, RepViT's classifier): the
    per-position pass normalises with its running statistics and leaves them as the pooled pass (timm's own forward)
    sets them, so eval-mode inference reads the same statistics."""
    import copy
    torch.manual_seed(0)
    plain = timm.create_model(trunk, num_classes=3, **kwargs).train()
    m = ssod_zoo.wrap(copy.deepcopy(plain)).train()
    x = torch.randn(4, 3, 64, 64)
    plain(x)
    m.forward_spatial(x)
    assert m.training and all(b.training for b in m.modules())
    buffers = dict(m.named_buffers())
    assert any('running_mean' in k for k in buffers)
    for key, value in plain.named_buffers():
        torch.testing.assert_close(buffers[key], value, rtol=0, atol=0, msg=key)
    torch.manual_seed(1)
    cls_map, _ = m.forward_positions(features := torch.randn(2, m.num_features, 2, 2))
    positions = features.permute(0, 2, 3, 1).reshape(8, -1, 1, 1)
    head = m.eval().forward_head(positions)  # the running statistics, as in eval mode
    torch.testing.assert_close(cls_map, head.reshape(2, 2, 2, -1).permute(0, 3, 1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['ssod_resnet18'])
def test_grad_checkpointing_gives_the_same_gradients(name):
    """timm's set_grad_checkpointing recomputes activations in the backward pass; both outputs' gradients match."""
    import copy
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=3).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    x = _input(plain)
    grads = []
    for m in (plain, checkpointed):
        out = m(x)
        (out.logits.square().mean() + out.ood_factor.mean()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and 'ood_head.weight' in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
