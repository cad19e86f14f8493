"""The sampler's OOD rule for few classes, and the warning when it starves the OOD head."""
import pytest
import torch

from ssod_zoo.loss import ood_cutoff, sample_patches


def test_chance_rule_equals_the_paper_rule_from_ten_classes_on():
    for m in (10, 100, 1000):
        assert ood_cutoff(0.95, m, 'chance') == ood_cutoff(0.95, m, 'paper') == pytest.approx(0.05)
    assert ood_cutoff(0.95, 3, 'chance') == pytest.approx(0.5 / 3)


def test_three_classes_background_is_ood_only_under_the_chance_rule():
    # a background patch spreads its mass: 0.10 on the label, 0.45 on each other class (3 classes)
    p = torch.tensor([0.10, 0.45, 0.45])
    cls_map = p.log().view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    target = torch.zeros(1, dtype=torch.int64)
    assert (sample_patches(cls_map, target, 0.95, 'paper') == -1).all()  # ignored: 0.10 >= 0.05
    assert (sample_patches(cls_map, target, 0.95, 'chance') == 0).all()  # OOD: 0.10 < 0.167


def test_training_warns_when_the_sampler_finds_no_background(capsys):
    from ssod_zoo.app.train import TrainConfig, _warn_starved_sampler
    _warn_starved_sampler({'frac_ood': 0.002, 'frac_id': 0.4}, TrainConfig(), num_classes=3)
    err = capsys.readouterr().err
    assert 'only 0.2% of feature-map positions were sampled as OOD' in err and '--ood-rule chance' in err
    _warn_starved_sampler({'frac_ood': 0.2, 'frac_id': 0.4}, TrainConfig(), num_classes=3)
    assert capsys.readouterr().err == ''
    # and when the classifier is not yet confident anywhere: almost no ID patches
    _warn_starved_sampler({'frac_ood': 0.2, 'frac_id': 0.01}, TrainConfig(), num_classes=3)
    err = capsys.readouterr().err
    assert 'only 1.0% of positions were sampled as ID' in err and '--warmup-epochs' in err and 'as OOD' not in err
    # with Outlier Exposure on, what empties the OOD set is the exposure itself (the study's bx runs: 0.8% and 0.2%)
    _warn_starved_sampler({'frac_ood': 0.008, 'frac_id': 0.2}, TrainConfig(exposure=0.5), num_classes=10)
    err = capsys.readouterr().err
    assert 'only 0.8% of feature-map positions' in err and '1/M = 0.10 on the label, above the cutoff of 0.05' in err
    assert 'lower --exposure' in err and 'else try a lower --gamma' in err
    # with 3 classes the other hint stays; with 100 classes a flattened patch (0.01) is under the cutoff: no claim
    _warn_starved_sampler({'frac_ood': 0.008, 'frac_id': 0.2}, TrainConfig(exposure=0.5), num_classes=3)
    assert 'lower --exposure' in (err := capsys.readouterr().err) and '--ood-rule chance' in err
    _warn_starved_sampler({'frac_ood': 0.008, 'frac_id': 0.2}, TrainConfig(exposure=0.5), num_classes=100)
    err = capsys.readouterr().err
    assert 'only 0.8% of feature-map positions' in err and 'exposure' not in err
