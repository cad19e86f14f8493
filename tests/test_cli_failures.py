"""Failures a user meets are one line that says what failed and what to do (issue 13, item 4)."""
import warnings

import pytest
import timm
import torch

import ssod_zoo


def test_wrap_rejects_a_vision_transformer_at_wrap_time():
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=3)
    with pytest.raises(TypeError, match=r'not a CNN.*tokens \(B, N, C\)'):
        ssod_zoo.wrap(vit)


def test_wrap_still_takes_cnns_and_meta_models():
    assert isinstance(ssod_zoo.wrap('test_resnet', num_classes=3), ssod_zoo.SSODModel)
    meta = timm.create_model('test_efficientnet', num_classes=3, device='meta')
    assert ssod_zoo.wrap(meta).ood_head.weight.device.type == 'meta'


def test_unnormalised_pixels_warn_once():
    model = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    pixels = torch.rand(2, 3, 64, 64) * 255
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter('always')
        model(torch.randn(2, 3, 64, 64))  # normalised: silent
        assert not [w for w in caught if '0-255' in str(w.message)]
        model(pixels)
        model(pixels)
    hits = [w for w in caught if '0-255' in str(w.message)]
    assert len(hits) == 1 and 'normalise' in str(hits[0].message)


def test_nan_input_is_still_rejected():
    model = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN or Inf'):
        model(x)
