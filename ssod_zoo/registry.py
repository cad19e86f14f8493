"""The registered SSOD models: ``timm.create_model('ssod_resnet50')`` and friends.

Each entrypoint builds the plain timm architecture and hands it to :func:`ssod_zoo.wrap`; there is no
per-architecture model code. Weights are ``ssod_<arch>.<tag>`` entries in ``default_cfgs``, one per entry of
``weights/manifest.json`` and no others (see :mod:`ssod_zoo.hub`); an entry without a tag describes the
architecture only (no weights) and stays each architecture's default, so ``create_model('ssod_<arch>')`` never
changes meaning when a weight is published.
"""
import warnings
from functools import partial
from typing import Any, Optional

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, split_model_name_tag
from timm.models._builder import resolve_pretrained_cfg
from torch import nn

from . import hub
from .adapter import SSODModel, _require_spatial, user_stacklevel, wrap

__all__ = []  # models are reached through timm.create_model

PAPER_ID = 'arXiv:2307.00519'
PAPER_NAME = 'Image Background Serves as Good Proxy for Out-of-distribution Data'


def _build(trunk: str, return_ood: bool = True, ood_threshold: Optional[float] = None,
           spatial_threshold: Optional[float] = None, readout: Optional[str] = None, ood_head_trained: bool = True,
           **kwargs: Any) -> SSODModel:
    model = wrap(timm.create_model(trunk, pretrained=False, **kwargs), return_ood=return_ood,
                 ood_threshold=ood_threshold, spatial_threshold=spatial_threshold, readout=readout,
                 ood_head_trained=ood_head_trained)
    model._trunk_kwargs = kwargs  # for features_only: the same trunk, built by timm as its feature extractor
    return model


def _create(trunk: str, variant: str, pretrained: bool = False, **kwargs: Any) -> SSODModel:
    if kwargs.get('features_only'):
        features = {k: kwargs.pop(k) for k in ('features_only', 'out_indices', 'feature_cls', 'feature_cfg')
                    if k in kwargs}
        with warnings.catch_warnings():  # the full model's (thresholds, label names): a feature extractor has none
            warnings.simplefilter('ignore')
            model = _create(trunk, variant, pretrained, **kwargs)
        return _trunk_features(trunk, model, pretrained, features)
    source = kwargs['pretrained_cfg'].get('source') if isinstance(kwargs.get('pretrained_cfg'), dict) else None
    if not pretrained and source in ('local-dir', 'hf-hub'):  # timm's rule, easy to forget: architecture only
        warnings.warn(f'{variant} from a {source}: spec with pretrained=False has the saved architecture and fresh, '
                      'untrained weights (and no thresholds); pass pretrained=True for the saved weights',
                      stacklevel=user_stacklevel())
    tag = kwargs.get('pretrained_cfg') if isinstance(kwargs.get('pretrained_cfg'), str) else None
    folder_args = kwargs.get('pretrained_model_args') or {}  # timm's copy of a local-dir:/hf-hub: config's
    given = {k for k in hub.CALIBRATED if k in kwargs and not (k in folder_args and kwargs[k] is folder_args[k])}
    # a registered weight brings the model arguments it was saved with (the thresholds, output_stride, ...)
    saved_args = hub._shipped_model_args(variant, tag)
    # the caller's own arguments (not a folder's, which timm passes along as if they were the caller's)
    own = {k: v for k, v in kwargs.items() if not (k in folder_args and v is folder_args[k])}
    if not pretrained:  # the architecture the weights need, not the calibration made on them: no weights here
        for key in hub.CALIBRATED:
            saved_args.pop(key, None)
            if key in folder_args and kwargs.get(key) is folder_args[key]:  # the folder's, not the caller's own
                del kwargs[key]
    for k, v in saved_args.items():
        kwargs.setdefault(k, v)
    if saved_args:
        kwargs.setdefault('pretrained_model_args', saved_args)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if overlay.get('hf_hub_id') and 'file' not in overlay:
        overlay['file'] = None  # a shipped file would otherwise win over the user's own repo
    try:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=overlay)
    except RuntimeError as e:  # an unknown tag
        raise RuntimeError(f'{e} Published SSOD weights for {variant}: '
                           f'{timm.list_pretrained(variant + ".*") or "none"}.') from e
    name = f'{variant}{"." + cfg.tag if cfg.tag else ""}'
    asked_size = (kwargs.get('pretrained_cfg_overlay') or {}).get('input_size')
    calibrated_size = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg')).input_size \
        if asked_size else None
    if pretrained:
        if not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
            tags = timm.list_pretrained(variant + '.*')
            where = (f'{variant}\'s published weights carry a tag ({", ".join(tags)}): timm.create_model('
                     f'\'{tags[0]}\', pretrained=True)' if tags else
                     f'none are published for {variant} (timm.list_pretrained("ssod_*") lists those that exist)')
            raise hub.NoDefaultWeights(
                f'{name} has no {"default " if tags else ""}SSOD weights; {where}. To fine-tune from timm\'s '
                'ImageNet classifier, build the model with pretrained=False and load the classifier\'s weights '
                f'into it (the OOD head starts fresh), as `python -m ssod_zoo.app.train --init {trunk}.<tag>` does.',
                tags)
        overlay.update(hub._prepare_pretrained(cfg, kwargs.get('cache_dir')))
        if overlay.get('hf_hub_id') and not overlay.get('file'):  # pointed at a repo: its config.json's model args
            repo_args = hub._repo_model_args(cfg, kwargs.get('cache_dir'))
            for k, v in repo_args.items():
                kwargs.setdefault(k, v)
            saved_args = {**repo_args, **saved_args}
            kwargs.setdefault('pretrained_model_args', saved_args)
    folder = hub._folder_config(cfg, kwargs.get('cache_dir')) if pretrained else {}
    # folders written before ood_head_trained was a model argument record a twin only at the top level
    if pretrained and 'ood_head_trained' not in kwargs and folder.get('ood_head_trained') is not None:
        kwargs['ood_head_trained'] = bool(folder['ood_head_trained'])
    kwargs['pretrained_cfg_overlay'] = overlay
    with hub._clear_errors(name):
        model = build_model_with_cfg(
            partial(_build, trunk), variant, pretrained,
            pretrained_filter_fn=hub._check_state_dict,
            **kwargs,
        )
    if saved_args:  # create_model adds its own kwargs to these, so save_pretrained writes them all again
        model._model_args = {**saved_args, **getattr(model, '_model_args', {})}
    weights_classes = cfg.num_classes
    if pretrained and model.num_classes not in (0, weights_classes):
        hub._forget_calibration(model, name, weights_classes)  # 0: no classifier, the OOD factor's still holds
    if pretrained and model.num_classes == 0:
        model._forget_spatial_calibration()  # no classifier, so no spatial score to compare it with
    if pretrained and folder.get('calibration'):
        # what the thresholds were calibrated on, for save_pretrained while they are still the folder's
        model._calibration_record = {'record': folder['calibration'], 'state': {
            k: (folder.get('model_args') or {}).get(k) for k in hub.CALIBRATED}}
    if not (pretrained and any(getattr(model, k) is not None for k in hub.THRESHOLDS if k not in given)):
        return model
    # the weights the thresholds were calibrated for: save_pretrained warns when they have changed since (trained)
    hub._remember_calibration(model, skip=given)
    # the weights' thresholds hold for the input size and architecture they were calibrated with; both scores move
    # with either (a class count of its own: _forget_calibration above)
    changed = [f'input_size {tuple(asked_size)}, calibrated at {tuple(calibrated_size)}'] if (
        calibrated_size and tuple(asked_size) != tuple(calibrated_size)) else []
    changed += [f'{k}={own[k]!r}, calibrated with {v!r}' for k, v in {**folder_args, **saved_args}.items()
                if k not in (*hub.CALIBRATED, *_NOT_SCORED) and k in own and own[k] != v]
    if changed:
        warnings.warn(f'{name}: built with {"; ".join(changed)}, where its scores are other numbers: its '
                      'thresholds are dropped (calibrate them for this model: ssod calibrate, or pass your own)',
                      stacklevel=user_stacklevel())
        for key in hub.CALIBRATED:
            if key not in given:  # a caller's own values are for the model asked
                setattr(model, key, None)
    return model


def _trunk_features(trunk: str, model: SSODModel, pretrained: bool, features: dict) -> nn.Module:
    """``features_only``: the feature extractor timm builds for the plain ``trunk`` (its own feature class, levels
    and module names, whatever the architecture), holding the SSOD model's trunk weights when they were asked for:
    the feature maps and ``feature_info`` are the plain model's."""
    overlay = {k: v for k, v in model.pretrained_cfg.items() if k not in ('source', 'file', 'hf_hub_id', 'url')}
    in_chans = model._trunk_kwargs.get('in_chans')
    if in_chans and overlay.get('input_size'):  # the weights' first conv already has them: nothing to adapt
        overlay['input_size'] = (in_chans, *overlay['input_size'][1:])
    if pretrained:  # the classifier's keys go as timm drops them for any feature extractor
        overlay['state_dict'] = {k: v for k, v in model.state_dict().items() if not k.startswith('ood_head.')}
    extractor = timm.create_model(trunk, pretrained=pretrained, pretrained_cfg_overlay=overlay,
                                  **model._trunk_kwargs, **features)
    for holder in (extractor, getattr(extractor, 'model', None)):  # timm keeps the overlay: not the weights again
        for attr in ('pretrained_cfg', 'default_cfg'):
            cfg = getattr(holder, attr, None)
            if isinstance(cfg, dict):
                cfg.pop('state_dict', None)
    return extractor


# model arguments that leave both scores as they are (num_classes has a rule of its own: hub._forget_calibration)
_NOT_SCORED = ('num_classes', 'return_ood', 'ood_head_trained', 'label_names', 'pretrained_model_args',
               'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'drop_rate', 'drop_path_rate',
               'drop_block_rate')


def _cfg(**kwargs: Any) -> dict:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'license': 'apache-2.0', 'paper_ids': PAPER_ID, 'paper_name': PAPER_NAME,
        **kwargs,
    }


_ARCH_CFGS = {
    'ssod_resnet18': _cfg(first_conv='conv1', classifier='fc'),
    'ssod_resnet34': _cfg(first_conv='conv1', classifier='fc'),
    'ssod_resnet50': _cfg(first_conv='conv1', classifier='fc'),
    'ssod_resnet101': _cfg(first_conv='conv1', classifier='fc'),
    'ssod_densenet121': _cfg(first_conv='features.conv0', classifier='classifier'),
    'ssod_regnety_008': _cfg(first_conv='stem.conv', classifier='head.fc'),
    'ssod_mobilenetv3_large_100': _cfg(first_conv='conv_stem', classifier='classifier'),
    # timm's 0.5M-parameter test network: fast tests and the embedded benchmark's checkpoint
    'ssod_test_resnet': _cfg(input_size=(3, 160, 160), pool_size=(5, 5), first_conv='conv1.0', classifier='fc'),
}
BUILT_IN = tuple(_ARCH_CFGS)  # the ssod_* models registered on import; register() adds others
# weight tags come from weights/manifest.json (a small json read), so only weights that exist are registered
default_cfgs = generate_default_cfgs({**_ARCH_CFGS, **hub._manifest_cfgs(_ARCH_CFGS)})
for _default in default_cfgs.values():
    # timm makes the first tag with weights the default; keep the untagged architecture the default instead
    _default.tags.remove('')
    _default.tags.appendleft('')


# what an SSOD architecture registered for another trunk (register) takes over from the trunk's own default config
_TRUNK_CFG_KEYS = ('input_size', 'pool_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std', 'first_conv',
                   'classifier', 'fixed_input_size')


def register(trunk: str) -> str:
    """Register ``ssod_<trunk>``, the SSOD model of any timm CNN ``trunk`` (an architecture name such as
    ``'efficientnet_b0'``), with timm, as the built-in ``ssod_*`` models are: ``timm.create_model``,
    :func:`ssod_zoo.save_pretrained`, ``push_to_hub`` and loading a saved folder then work for it alike. Its config
    (preprocessing, first conv, classifier) is the trunk's default one.

    There is seldom a need to call it: ``timm.create_model`` registers ``ssod_<trunk>`` the first time it is asked
    for it (by name, or by a ``local-dir:``/``hf-hub:`` config naming it), and saving a :func:`ssod_zoo.wrap` of
    such a trunk registers it too. ``timm.is_model`` and ``timm.list_models`` see it once it is registered.

    Returns:
        The registered name; one already registered (built in, or by an earlier call) is left as it is.
    """
    name = f'ssod_{trunk}'
    if '.' not in trunk and timm.is_model(name):
        return name
    if '.' in trunk or not timm.is_model(trunk) or trunk.startswith('ssod_'):
        raise ValueError(f'register({trunk!r}): not a timm architecture name (timm.list_models() lists them; no '
                         '.tag: the weights are a matter for loading; not an ssod_ name: those are registered)')
    try:  # a CNN, as wrap requires, checked on the meta device: no weights are made
        _require_spatial(timm.create_model(trunk, pretrained=False, device='meta'))
    except TypeError as e:
        raise ValueError(f'register({trunk!r}): {e}') from None
    plain = timm.models.get_pretrained_cfg(trunk)
    cfg = {k: getattr(plain, k) for k in _TRUNK_CFG_KEYS if plain is not None and getattr(plain, k) is not None}
    default_cfgs.update(generate_default_cfgs({name: _cfg(**cfg)}))  # read by register_model

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> SSODModel:
        return _create(trunk, name, pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    register_model(entrypoint)
    return name


@register_model
def ssod_resnet18(pretrained: bool = False, **kwargs: Any) -> SSODModel:
    return _create('resnet18', 'ssod_resnet18', pretrained, **kwargs)


@register_model
def ssod_resnet34(pretrained: bool = False, **kwargs: Any) -> SSODModel:
    return _create('resnet34', 'ssod_resnet34', pretrained, **kwargs)


@register_model
def ssod_resnet50(pretrained: bool = False, **kwargs: Any) -> SSODModel:
    return _create('resnet50', 'ssod_resnet50', pretrained, **kwargs)


@register_model
def ssod_resnet101(pretrained: bool = False, **kwargs: Any) -> SSODModel:
    return _create('resnet101', 'ssod_resnet101', pretrained, **kwargs)


@register_model
def ssod_densenet121(pretrained: bool = False, **kwargs: Any) -> SSODModel:
    return _create('densenet121', 'ssod_densenet121', pretrained, **kwargs)


@register_model
def ssod_regnety_008(pretrained: bool = False, **kwargs: Any) -> SSODModel:
    return _create('regnety_008', 'ssod_regnety_008', pretrained, **kwargs)


@register_model
def ssod_mobilenetv3_large_100(pretrained: bool = False, **kwargs: Any) -> SSODModel:
    return _create('mobilenetv3_large_100', 'ssod_mobilenetv3_large_100', pretrained, **kwargs)


@register_model
def ssod_test_resnet(pretrained: bool = False, **kwargs: Any) -> SSODModel:
    return _create('test_resnet', 'ssod_test_resnet', pretrained, **kwargs)


def _register_on_create() -> None:
    """Let ``timm.create_model`` register ``ssod_<trunk>`` (:func:`register`) for a timm CNN ``trunk`` the first time
    it is asked for that name: a folder or Hub repo saved from such a model then loads in a new process with
    ``timm.create_model('local-dir:...')`` or ``'hf-hub:...'``, as the built-in models do. timm 1.0 has no plugin
    hook; this wraps the ``is_model`` that ``create_model`` checks a name with (``timm.is_model`` is left as it is)."""
    from timm.models import _factory
    timm_is_model = getattr(_factory, 'is_model', None)
    if not callable(timm_is_model):  # another timm: register() still does it
        return

    def is_model(model_name: str) -> bool:
        # a trunk that is not a CNN: register's ValueError says why, where timm would say 'Unknown model'
        register_on_request(split_model_name_tag(model_name)[0])
        return timm_is_model(model_name)
    _factory.is_model = is_model


def register_on_request(arch: str) -> None:
    """Register ``arch`` when it is ``ssod_<trunk>`` of a timm model ``trunk`` and not registered yet
    (:func:`register`, whose ValueError says why a trunk cannot be one); any other name is left alone."""
    trunk = arch[len('ssod_'):] if arch.startswith('ssod_') else ''
    if trunk and not timm.is_model(arch) and timm.is_model(trunk):
        register(trunk)


_register_on_create()
