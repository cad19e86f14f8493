"""Failures a user meets are one line that says what failed and what to do (issue 13, item 4)."""
import sys
import warnings
from functools import partial

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


def test_input_gradients_pass_without_warnings():
    # ODIN, saliency maps and adversarial checks differentiate with respect to the input: the input check must
    # not read a graph-attached tensor as a Python float (torch warns on every call then)
    model = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model(x)[0].max(1).values.sum().backward()
    assert x.grad is not None and not [str(w.message) for w in caught]


def test_nan_input_is_still_rejected():
    model = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN or Inf'):
        model(x)


def test_push_offline_is_one_line_with_what_to_do(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    from ssod_zoo.app import publish
    from cli_helpers import make_checkpoint

    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled('Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.')

    monkeypatch.setattr(HfApi, 'create_repo', offline)
    ckpt = make_checkpoint(tmp_path / 'best.pt', threshold=0.5)
    with pytest.raises(SystemExit) as e:
        publish.main(['push', str(ckpt), 'me/my-ssod'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'ssod save' in err[0] and 'OfflineModeIsEnabled' in err[0]


def test_push_without_a_reachable_hub_is_one_line(tmp_path, monkeypatch, capsys):
    """The real transport error of the installed huggingface_hub (a refused connection), not a stand-in."""
    from huggingface_hub import constants

    from ssod_zoo.app import publish
    from cli_helpers import make_checkpoint

    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # the discard port: nothing listens
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    ckpt = make_checkpoint(tmp_path / 'best.pt', threshold=0.5)
    with pytest.raises(SystemExit) as e:
        publish.main(['push', str(ckpt), 'me/my-ssod', '--token', 'hf_test'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'uploading to the Hugging Face Hub failed' in err[0] and 'ssod save' in err[0]


def test_export_takes_tags_and_writes_label_names(tmp_path):
    import json

    from ssod_zoo.export import _build_model, _metadata
    from cli_helpers import NAMES, make_checkpoint

    model = _build_model(str(make_checkpoint(tmp_path / 'c.pt', threshold=0.5, size=48)), None, None)
    meta = _metadata(model, (3, 48, 48))
    assert json.loads(meta['ssod_zoo.label_names']) == list(NAMES)
    assert json.loads(meta['ssod_zoo.input_size']) == [3, 48, 48] and 'ssod_zoo.ood_threshold' in meta
    tagged = _build_model('ssod_test_resnet.synthetic', None, None)  # a tag names weights: load them
    assert tagged.ood_threshold is not None and tuple(tagged.pretrained_cfg['input_size']) == (3, 96, 96)
    assert len(json.loads(_metadata(tagged, (3, 96, 96))['ssod_zoo.label_names'])) == tagged.num_classes


@pytest.mark.parametrize('load', [ssod_zoo.load_model, partial(timm.create_model, pretrained=True)],
                         ids=['load_model', 'timm.create_model'])
def test_loading_with_another_class_count_drops_label_names_and_threshold(load):
    with pytest.warns(UserWarning, match='label_names and ood_threshold are dropped'):
        model = load('ssod_test_resnet.synthetic', num_classes=3)
    assert model.ood_threshold is None and 'label_names' not in model.pretrained_cfg
    kept = load('ssod_test_resnet.synthetic')  # the weights' own class count: calibration kept
    assert kept.ood_threshold is not None and len(kept.pretrained_cfg['label_names']) == kept.num_classes
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no classifier (num_classes=0): the OOD factor and its threshold still hold
        assert load('ssod_test_resnet.synthetic', num_classes=0).ood_threshold == kept.ood_threshold



def test_a_tag_without_its_weights_has_their_architecture_but_not_their_threshold():
    random = timm.create_model('ssod_test_resnet.synthetic', pretrained=False)
    shipped = timm.create_model('ssod_test_resnet.synthetic', pretrained=True)
    assert random.ood_threshold is None and shipped.ood_threshold is not None
    x = torch.randn(1, 3, 96, 96)
    assert random.forward_features(x).shape == shipped.forward_features(x).shape  # output_stride=16 kept


@pytest.mark.parametrize('command, argv, message', [
    ('train', ['--gamma', '1.5'], 'argument --gamma: must be in (0.5, 1], got 1.5'),
    ('train', ['--batch-size', '0'], 'argument --batch-size: must be >= 1, got 0'),
    ('eval', ['--model', 'm', '--val-dir', '.', '--ood-dirs', '.', '--knn-k', '0'], 'argument --knn-k: must be >= 1'),
    ('predict', ['m', 'x.png', '--threshold', '2'], 'argument --threshold: must be in [0, 1]'),
    ('save', ['c.pt', 'out', '--ood-threshold', '3'], 'argument --ood-threshold: must be in [0, 1], as ood_factor is'),
    ('push', ['c.pt', 'me/r', '--ood-threshold', '-0.1'], 'argument --ood-threshold: must be in [0, 1]'),
    ('demo', ['--retrain', '--ood-per-set', '0'], 'argument --ood-per-set: must be >= 1, got 0'),
    # 'inf' and 'nan' parse as floats and pass a bare '>= 0' (--exposure=inf trained on, with a loss of inf)
    ('train', ['--exposure', 'inf'], 'argument --exposure: must be a finite number, got inf'),
    ('train', ['--alpha', 'nan'], 'argument --alpha: must be a finite number, got nan'),
    ('demo', ['--retrain', '--lr', 'inf'], 'argument --lr: must be a finite number, got inf'),
])
def test_out_of_range_values_stop_at_parsing_in_one_line(command, argv, message, capsys):
    """Before any model loads or feature is extracted (a bad --knn-k used to fail after scoring every set)."""
    from ssod_zoo.app import cli

    with pytest.raises(SystemExit) as e:
        cli.main([command, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f'ssod {command}: error: {message}'), err
    assert not any('Traceback' in line for line in err)


def test_an_ood_threshold_outside_0_1_is_refused_from_python_too(tmp_path):
    """Set at creation, at save, or as an attribute and then used: ood_factor is in [0, 1], so is the cut."""
    from ssod_zoo import save_pretrained

    with pytest.raises(ValueError, match='ood_threshold must be in \\[0, 1\\], as ood_factor is, got 3'):
        timm.create_model('ssod_test_resnet', ood_threshold=3)
    model = timm.create_model('ssod_test_resnet', ood_threshold=0.5)
    with pytest.raises(ValueError, match='got -1'):
        save_pretrained(model, tmp_path / 'hub', ood_threshold=-1)
    assert not (tmp_path / 'hub').exists()
    model.ood_threshold = 1.5
    with pytest.raises(ValueError, match='got 1.5'):
        model.accepts(torch.rand(4))
    assert model.accepts(torch.tensor([0.2, 0.9]), threshold=0.5).tolist() == [False, True]


def test_train_checks_ranges_for_api_callers_too():
    from ssod_zoo.app.train import RANGES, TrainConfig, TrainError, train

    defaults = TrainConfig()
    assert all(accepts(getattr(defaults, name)) for name, (accepts, _) in RANGES.items())  # names exist, defaults pass
    with pytest.raises(TrainError, match=r'--lr-step must be >= 1, got 0'):
        train(TrainConfig(lr_step=0))
    with pytest.raises(TrainError, match=r'--exposure must be a finite number, got inf'):
        train(TrainConfig(exposure=float('inf')))
    with pytest.raises(TrainError, match=r'--exposure 2 acts with the OOD loss, which --ce-only never switches on'):
        train(TrainConfig(exposure=2.0, ce_only=True))


def test_eval_with_a_missing_model_is_one_line(tmp_path, capsys):
    from ssod_zoo.app import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main(['--model', str(tmp_path / 'bestt.pt'), '--val-dir', str(tmp_path), '--ood-dirs', str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('ssod eval: error: ') and 'bestt.pt' in err[0], err


def test_warnings_of_a_command_are_one_line_each(monkeypatch):
    """`ssod eval` on a small fit set warns about KNN, Mahalanobis and ViM: one line each, named by the command,
    without Python's file:line and the echoed source line; Python's format is back afterwards."""
    import types
    from ssod_zoo.app import cli

    shown = []
    fake = types.ModuleType('fake_command')
    fake.main = lambda argv: shown.append(warnings.formatwarning(UserWarning('KNN: k=50 ...'), UserWarning,
                                                                 '/x/evaluate.py', 173, 'detectors.update(...)'))
    monkeypatch.setitem(sys.modules, 'fake_command', fake)
    monkeypatch.setitem(cli.COMMANDS, 'eval', ('fake_command', 'help'))
    monkeypatch.setattr(cli, '_require_extra', lambda *a: None)
    before = warnings.formatwarning
    cli.main(['eval'])
    assert shown == ['ssod eval: warning: KNN: k=50 ...\n']
    assert warnings.formatwarning is before


def test_bare_ssod_lists_the_commands_and_exits_2(capsys):
    from ssod_zoo.app import cli

    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    listed = capsys.readouterr().out
    assert all(f'  {name} ' in listed for name in cli.COMMANDS)


def test_release_without_its_run_is_one_line(tmp_path, capsys):
    from ssod_zoo.app import cli

    with pytest.raises(SystemExit) as e:
        cli.main(['release', str(tmp_path / 'no-run'), str(tmp_path / 'out'), '--protocol', 'fashion-mnist'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # about the run, checked before the data is looked for
    assert err == [f'ssod release: error: {tmp_path / "no-run"} has no best.pt or last.pt; give the --out-dir of a '
                   'finished `ssod train` run'], err
