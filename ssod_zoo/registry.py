"""The registered SSOD models: ``timm.create_model('ssod_resnet50')`` and friends.

Each entrypoint builds the plain timm architecture and hands it to :func:`ssod_zoo.wrap`; there is no
per-architecture model code. Weights are ``ssod_<arch>.<tag>`` entries in ``default_cfgs``; an entry without
a tag describes the architecture only (no weights).
"""
from functools import partial
from typing import Any, Optional

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from .adapter import SSODModel, wrap

__all__ = []  # models are reached through timm.create_model

PAPER_ID = 'arXiv:2307.00519'
PAPER_NAME = 'Image Background Serves as Good Proxy for Out-of-distribution Data'


def _build(trunk: str, return_ood: bool = True, ood_threshold: Optional[float] = None, **kwargs: Any) -> SSODModel:
    trunk = timm.create_model(trunk, pretrained=False, **kwargs)
    return wrap(trunk, return_ood=return_ood, ood_threshold=ood_threshold)


def _create(trunk: str, variant: str, pretrained: bool = False, **kwargs: Any) -> SSODModel:
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
            raise RuntimeError(
                f'{variant}{"." + cfg.tag if cfg.tag else ""} has no SSOD weights; timm.list_pretrained("ssod_*") '
                f'lists those that exist. To fine-tune from timm\'s ImageNet classifier, build the model with '
                f'pretrained=False and load the classifier\'s weights into it (the OOD head starts fresh), '
                f'as `python -m ssod_zoo.train --init {trunk}.<tag>` does.')
    return build_model_with_cfg(
        partial(_build, trunk), variant, pretrained,
        # forward_intermediates() of the timm trunk serves features_only for every architecture
        feature_cfg=dict(feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'license': 'apache-2.0', 'paper_ids': PAPER_ID, 'paper_name': PAPER_NAME,
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'ssod_resnet18': _cfg(first_conv='conv1', classifier='fc'),
    'ssod_resnet34': _cfg(first_conv='conv1', classifier='fc'),
    'ssod_resnet50': _cfg(first_conv='conv1', classifier='fc'),
    'ssod_resnet101': _cfg(first_conv='conv1', classifier='fc'),
    'ssod_densenet121': _cfg(first_conv='features.conv0', classifier='classifier'),
    'ssod_regnety_008': _cfg(first_conv='stem.conv', classifier='head.fc'),
    'ssod_mobilenetv3_large_100': _cfg(first_conv='conv_stem', classifier='classifier'),
    # timm's 0.5M-parameter test network: fast tests and the embedded benchmark's checkpoint
    'ssod_test_resnet': _cfg(input_size=(3, 160, 160), pool_size=(5, 5), first_conv='conv1.0', classifier='fc'),
})


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
