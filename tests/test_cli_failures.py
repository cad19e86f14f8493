"""Failures a user meets are one line that says what failed and what to do (issue 13, item 4)."""
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import ssod_zoo


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


def test_nan_input_is_rejected_unless_the_check_is_turned_off():
    """The check's message offers model.check_finite = False (a pass over the input saved, for throughput): then
    the input goes through unchecked, NaN in, NaN out."""
    model = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN or Inf.*check_finite = False'):
        model(x)
    model.check_finite = False
    with torch.no_grad():
        assert model(x).logits.isnan().all() and model.forward_scores(x).spatial_score.isnan().all()


def test_push_offline_is_one_line_with_what_to_do(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    from ssod_zoo.app import publish
    from cli_helpers import make_checkpoint

    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled('Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.')

    monkeypatch.setattr(HfApi, 'create_repo', offline)
    ckpt = make_checkpoint(tmp_path / 'best.pt', threshold=0.5, spatial_threshold=3.0)
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
    ckpt = make_checkpoint(tmp_path / 'best.pt', threshold=0.5, spatial_threshold=3.0)
    with pytest.raises(SystemExit) as e:
        publish.main(['push', str(ckpt), 'me/my-ssod', '--token', 'hf_test'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'uploading to the Hugging Face Hub failed' in err[0] and 'ssod save' in err[0]


def test_export_takes_tags_and_writes_label_names(tmp_path):
    import json

    from ssod_zoo.app.export import _build_model
    from ssod_zoo.export import _metadata
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
def test_loading_with_another_class_count_drops_label_names_and_the_spatial_threshold(load):
    with pytest.warns(UserWarning, match='label_names and spatial_threshold are dropped'):
        model = load('ssod_test_resnet.synthetic', num_classes=3)
    assert model.spatial_threshold is None and model.readout is None and 'label_names' not in model.pretrained_cfg
    kept = load('ssod_test_resnet.synthetic')  # the weights' own class count: calibration kept
    # the OOD head is the weights' own, and so is its threshold, as after reset_classifier (num_classes=0 below)
    assert model.ood_threshold == kept.ood_threshold is not None
    assert kept.ood_threshold is not None and len(kept.pretrained_cfg['label_names']) == kept.num_classes
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no classifier (num_classes=0): the OOD factor and its threshold still hold
        headless = load('ssod_test_resnet.synthetic', num_classes=0)
    assert headless.ood_threshold == kept.ood_threshold and headless.spatial_threshold is None  # no classifier
    with pytest.raises(RuntimeError, match='spatial_score needs the classification head'):
        headless.spatial_score(torch.randn(1, 3, 96, 96))


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
    ('predict', ['m', 'x.png', '--rule', 'factor', '--threshold', '2'],
     'argument --threshold: must be in [0, 1] for --rule factor'),
    ('save', ['c.pt', 'out', '--ood-threshold', '3'], 'argument --ood-threshold: must be in [0, 1], as ood_factor is'),
    ('push', ['c.pt', 'me/r', '--ood-threshold', '-0.1'], 'argument --ood-threshold: must be in [0, 1]'),
    ('demo', ['--retrain', '--ood-per-set', '0'], 'argument --ood-per-set: must be >= 1, got 0'),
    # 'inf' and 'nan' parse as floats and pass a bare '>= 0' (--exposure=inf trained on, with a loss of inf)
    ('train', ['--exposure', 'inf'], 'argument --exposure: must be a finite number, got inf'),
    ('train', ['--alpha', 'nan'], 'argument --alpha: must be a finite number, got nan'),
    ('demo', ['--retrain', '--lr', 'inf'], 'argument --lr: must be a finite number, got inf'),
    ('export', ['ssod_test_resnet', '--out', 'x.onnx', '--batch-size', '0'], 'argument --batch-size: must be >= 1'),
    ('export', ['ssod_test_resnet', '--out', 'x.onnx', '--input-size', '3', '0', '96'],
     'argument --input-size: must be >= 1, got 0'),
    ('export', ['ssod_test_resnet', '--out', 'x.onnx', '--pretrained', '--checkpoint', 'c.pt'],
     '--pretrained loads published weights and --checkpoint loads a file: give one of them'),
    ('predict', ['m', 'x.png', '--out', 'p.txt'], '--out p.txt: name a .csv or .jsonl file'),
    # 3 scored at chance, 0.001 resized every image to 64000 px
    ('eval', ['--model', 'm', '--val-dir', '.', '--ood-dirs', '.', '--crop-pct', '3'],
     "argument --crop-pct: must be in [0.5, 1.5] (timm's pretrained configs use 0.875 to 1.15), got 3"),
    ('train', ['--crop-pct', '0.001'], 'argument --crop-pct: must be in [0.5, 1.5]'),
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


def test_a_model_that_is_not_there_is_named_for_what_it_is(tmp_path, capsys):
    """A missing MODEL is called missing, not a folder to calibrate with --out; a folder without config.json is
    called that, not a timm config error."""
    from ssod_zoo.app import cli
    (tmp_path / 'imgs').mkdir()
    Image.new('RGB', (32, 32)).save(tmp_path / 'imgs' / 'a.png')
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'a.txt').write_text('x')
    for argv, says in (
            (['calibrate', str(tmp_path / 'gone'), '--val-dir', str(tmp_path / 'imgs')],
             f'{tmp_path / "gone"}: no such file or folder (nor an hf-hub:org/repo or a registered'),
            (['calibrate', 'ssod_test_resnet.synthetic', '--val-dir', str(tmp_path / 'imgs')],
             'is not a hub folder to update in place: give --out FOLDER'),
            (['predict', str(tmp_path / 'notes'), str(tmp_path / 'imgs')],
             f'{tmp_path / "notes"} is a folder without config.json (it holds: a.txt), so not a saved model')):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and says in err[-1], err


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
    # a run whose epochs are all warm-up would publish an OOD head it never trained as a trained one
    with pytest.raises(TrainError, match=r'--warmup-epochs 5 leaves none of the 1 epochs to the OOD loss.*--ce-only'):
        train(TrainConfig(epochs=1, warmup_epochs=5))


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


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
@pytest.mark.parametrize('command, argv', [
    ('eval', ['--model', 'm', '--val-dir', '.', '--ood-dirs', '.']),
    ('predict', ['m', 'x.png']),
    ('calibrate', ['m', '--val-dir', '.']),
    ('train', ['--model', 'ssod_test_resnet', '--data', 'synthetic']),  # where 'auto' is also allowed
])
def test_device_cuda_without_cuda_stops_at_parsing(command, argv, capsys):
    from ssod_zoo.app import cli

    with pytest.raises(SystemExit) as e:
        cli.main([command, *argv, '--device', 'cuda'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f'ssod {command}: error: argument --device: cuda: torch sees no CUDA device on this machine; '
                       'use --device cpu'), err


@pytest.mark.parametrize('size, message', [
    (['3', '8', '8'], 'total stride of 32, so a 8x8 input leaves no feature-map position of its own; use at least '
                      '32x32'),  # checked as 'SSODResNet has a <message> (the model is configured for 160x160)'
    (['1', '96', '96'], 'input_size (1, 96, 96) has 1 channels but the model takes 3'),
])
def test_export_refuses_an_input_size_the_model_cannot_take_before_exporting(tmp_path, capsys, size, message):
    import onnx  # noqa: F401  (the [test] extra has it: a missing onnx fails, as in test_export.py)
    from ssod_zoo.app import export

    with pytest.raises(SystemExit) as e:
        export.main(['ssod_test_resnet', '--out', str(tmp_path / 'x.onnx'), '--input-size', *size])
    # exactly export's own check: the same error raised inside torch.export would come wrapped in its report
    assert str(e.value) == (f'ssod export: error: {message}' if size[0] == '1' else
                            f'ssod export: error: SSODResNet has a {message} (the model is configured for 160x160)')
    assert not (tmp_path / 'x.onnx').exists()
    # a bare architecture name exports fresh weights: said once, with what to give instead
    assert 'ssod_test_resnet has fresh, untrained weights' in capsys.readouterr().err
    # calibrated weights at a size they cannot take: the error alone, before any word on their thresholds
    with pytest.raises(SystemExit) as e, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter('always')
        export.main(['ssod_test_resnet.synthetic', '--pretrained', '--out', str(tmp_path / 'x.onnx'),
                     '--input-size', *size])
    assert message.split(', so ')[-1].split(';')[0] in str(e.value)  # (its stride is 16)
    assert not [w for w in said if 'threshold' in str(w.message)] and 'threshold' not in capsys.readouterr().err


def test_export_of_weights_from_another_architecture_is_one_line(tmp_path):
    """A plain timm ResNet-18's weights given as the test network's: one line, not torch's key listing."""
    from ssod_zoo.app import export

    torch.save(timm.create_model('resnet18', num_classes=3).state_dict(), tmp_path / 'r18.pth')
    with pytest.raises(SystemExit) as e:
        export.main(['ssod_test_resnet', '--checkpoint', str(tmp_path / 'r18.pth'), '--out', str(tmp_path / 'x.onnx')])
    message = str(e.value)
    assert message.startswith(f'ssod export: error: --checkpoint {tmp_path / "r18.pth"} does not fit ssod_test_resnet: '
                              'Missing key(s) in state_dict: "conv1.0.weight"') and '\n' not in message
    assert message.endswith('more problems); give the architecture it was saved from as MODEL, or its hub folder or training '
                            'checkpoint alone') and not (tmp_path / 'x.onnx').exists()


class _Labelled:
    num_classes = 3
    pretrained_cfg = {'label_names': ('cat', 'dog', 'emu')}


@pytest.mark.parametrize('folders, outcome', [
    (['cat', 'dog', 'emu'], None),
    (['0_cat', '1_dog', '2_emu'], 'warning'),
    (['cat', 'dog'], 'needs one sub-folder per class of the model (its classes, in order: cat, dog, emu)'),
    # a model's class named up to case, at another place (it used to pass as "not the label names", graded wrongly)
    (['Dog', 'cat', 'emu_x'], "folder 'Dog' is number 0 in sorted order, so ID accuracy would take it for the "
                              "model's class 1 of 'dog'"),
])
def test_eval_checks_the_class_folders_against_the_models_labels(folders, outcome, capsys):
    import argparse

    from ssod_zoo.app.evaluate import _check_class_folders

    parser = argparse.ArgumentParser(prog='ssod eval')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        if outcome not in (None, 'warning'):
            with pytest.raises(SystemExit):
                _check_class_folders(parser, '--model m', _Labelled(), folders, 'val', None)
            assert outcome in capsys.readouterr().err
        else:
            _check_class_folders(parser, '--model m', _Labelled(), folders, 'val', None)
    messages = [str(w.message) for w in caught]
    assert messages == ([] if outcome != 'warning' else [
        'the class folders of val (0_cat, 1_dog, 2_emu) are not the label names of --model m (its classes, in '
        'order: cat, dog, emu); ID accuracy and the per-class fits take folder i, in sorted order, as class i'])


@pytest.fixture
def two_class_folders(tmp_path):
    """ID folders a/ and b/, an OOD folder, and a 2-class hub model saved with class_names ['a', 'b']."""
    from PIL import Image

    from ssod_zoo import save_pretrained

    for folder, n in (('val/a', 4), ('val/b', 4), ('ood', 6)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            Image.new('RGB', (64, 64), (40 * i, 20, 200)).save(tmp_path / folder / f'{i}.png')
    model = timm.create_model('ssod_test_resnet', num_classes=2, pretrained_cfg_overlay={'input_size': (3, 64, 64)})
    save_pretrained(model, tmp_path / 'hub', ood_threshold=0.5, class_names=['a', 'b'])
    save_pretrained(model, tmp_path / 'hub_ba', ood_threshold=0.5, class_names=['b', 'a'])

    def run(hub='hub', *extra):
        from ssod_zoo.app import evaluate
        return evaluate.main(['--model', f'local-dir:{tmp_path / hub}', '--val-dir', str(tmp_path / 'val'),
                              '--ood-dirs', str(tmp_path / 'ood'), '--no-plots', '--bootstrap', '0', '--workers', '0',
                              '--out', str(tmp_path / 'out'), *extra])
    return run


def test_eval_limit_caps_folder_sets_too(two_class_folders, tmp_path):
    """--limit used to act with --protocol only, and on folders scored everything without a word."""
    import json

    two_class_folders('hub', '--limit', '3')
    rates = json.loads((tmp_path / 'out' / 'results.json').read_text())['accept_rates']['ssod']
    assert {k: v['n'] for k, v in rates.items()} == {'id': 3, 'ood': 3}, rates


def test_eval_checks_its_class_folders_end_to_end(two_class_folders, tmp_path, capsys):
    import csv

    # the model's class names in another order than the folders sort in: matched by name, up to case and
    # punctuation (it used to stop, asking for renamed folders); ImageFolder alone would take a/ for class 0, 'b'
    (tmp_path / 'val' / 'a').rename(tmp_path / 'val' / 'A')
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter('always')
        two_class_folders('hub_ba')
    assert not [w for w in said if 'label names' in str(w.message)]  # they are the model's, matched by name
    with open(tmp_path / 'out' / 'scores.csv', newline='') as f:
        targets = {(Path(r['path']).parent.name, r['target']) for r in csv.DictReader(f) if r['set'] == 'id'}
    assert targets == {('A', '1'), ('b', '0')}
    (tmp_path / 'val' / 'A').rename(tmp_path / 'val' / 'a')
    # a baseline that orders the same classes otherwise: one of the two would be graded against the wrong labels
    with pytest.raises(SystemExit) as e:
        two_class_folders('hub_ba', '--baseline-model', f'local-dir:{tmp_path / "hub"}')
    assert e.value.code == 2 and 'order their classes differently' in capsys.readouterr().err
    # other names: scored, with a warning
    (tmp_path / 'val' / 'a').rename(tmp_path / 'val' / '0_a')
    with pytest.warns(UserWarning, match=r'the class folders of .*val \(0_a, b\) are not the label names'):
        two_class_folders('hub')
    # one of the model's names, at another place: its images would be graded as the other class
    (tmp_path / 'val' / '0_a').rename(tmp_path / 'val' / 'c')
    with pytest.raises(SystemExit) as e:
        two_class_folders('hub')
    assert e.value.code == 2
    assert "folder 'b' is number 0 in sorted order, so ID accuracy would take it for the model's class 1 of 'b'" in \
        capsys.readouterr().err


def test_eval_checks_the_fit_classes_and_the_input_size(two_class_folders, tmp_path, capsys):
    """A --fit-dir of other classes fitted the per-class detectors on them without a word (Mahalanobis then read
    FPR95 0 on a 2-class fit of a 4-class model); an --img-size under the network's stride scored at chance."""
    import shutil
    shutil.copytree(tmp_path / 'val' / 'a', tmp_path / 'fit' / 'a')
    shutil.copytree(tmp_path / 'val' / 'a', tmp_path / 'fit' / 'c')
    for extra, said in ((['--fit-dir', str(tmp_path / 'fit')], f"--fit-dir {tmp_path / 'fit'} must have the ID set's "
                         'classes: lacks b; has c that the ID set has not (2 against 2 classes); KNN, Mahalanobis, '
                         'ViM and ReAct are fitted per class'),
                        (['--img-size', '8'], '--img-size 8: --model: SSODResNet has a total stride of 32, so a 8x8 '
                                              'input leaves no feature-map position of its own')):
        with pytest.raises(SystemExit) as e:
            two_class_folders('hub', *extra)
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
    shutil.copytree(tmp_path / 'val' / 'b', tmp_path / 'fit2' / 'B')  # the ID classes up to case: fitted
    shutil.copytree(tmp_path / 'val' / 'a', tmp_path / 'fit2' / 'a')
    two_class_folders('hub', '--fit-dir', str(tmp_path / 'fit2'))


def test_eval_of_a_tag_without_default_weights_is_one_line(tmp_path, capsys):
    from ssod_zoo.app import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main(['--model', 'ssod_test_resnet', '--val-dir', str(tmp_path), '--ood-dirs', str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the command's own spec to give, not the Python call the library's error suggests
    assert err == ['ssod eval: error: ssod_test_resnet names an architecture without default weights: give weights '
                   'instead, by their tagged name (ssod_test_resnet.synthetic), a checkpoint, a hub folder or '
                   'hf-hub:ORG/REPO'], err


def test_predict_creates_the_output_folder_and_warns_on_an_empty_pattern(tmp_path, capsys):
    from PIL import Image

    from ssod_zoo.app import predict

    Image.new('RGB', (96, 96), (200, 30, 30)).save(tmp_path / 'a.png')
    out = tmp_path / 'new' / 'deeper' / 'p.csv'
    with pytest.warns(UserWarning, match=r"'nomatch/\*.jpg' matches no image files"):
        predict.main(['ssod_test_resnet.synthetic', str(tmp_path / 'a.png'), 'nomatch/*.jpg', '--out', str(out),
                      '--workers', '0'])
    assert out.read_text().splitlines()[0].startswith('path,label,class')


def test_save_on_a_hub_folder_says_it_is_one(tmp_path, capsys):
    from ssod_zoo import save_pretrained
    from ssod_zoo.app import publish

    save_pretrained(timm.create_model('ssod_test_resnet', num_classes=2), tmp_path / 'hub')
    with pytest.raises(SystemExit) as e:
        publish.main(['save', str(tmp_path / 'hub'), str(tmp_path / 'out')])
    assert e.value.code == 2
    assert 'is already a hub-ready folder; load it with timm.create_model("local-dir:' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_one_line_drops_the_module_path_a_worker_puts_before_the_error():
    from ssod_zoo.app.images import ImageError, one_line

    wrapped = ImageError('Caught ImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                         'last):\n  File "x.py", line 1\nssod_zoo.app.images.ImageError: cannot read image v/b.png: '
                         'UnidentifiedImageError: nope')
    assert one_line(wrapped) == 'cannot read image v/b.png: UnidentifiedImageError: nope'


def test_a_folder_scan_names_the_files_it_does_not_read(tmp_path):
    """A .gif or .txt among the images used to be skipped without a word (hidden files stay unmentioned)."""
    from PIL import Image

    from ssod_zoo.app.images import ImageFiles
    from ssod_zoo.app.predict import find_images

    Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
    Image.new('RGB', (8, 8)).save(tmp_path / 'pal.gif')
    (tmp_path / 'notes.txt').write_text('x')
    (tmp_path / '.DS_Store').write_text('x')
    for scan in (lambda: find_images([str(tmp_path)]), lambda: ImageFiles(tmp_path).paths):
        with pytest.warns(UserWarning) as caught:
            assert scan() == [tmp_path / 'a.png']
        assert [str(w.message) for w in caught] == [
            f'{tmp_path}: skipped 2 files without one of the suffixes read in folders (notes.txt, pal.gif): .jpg, '
            ".jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp (torchvision ImageFolder's; a file named on its own is "
            'read whatever its suffix)']


@pytest.mark.parametrize('command', ['predict', 'calibrate', 'save', 'export'])
def test_a_training_run_folder_given_as_model_names_its_checkpoint(tmp_path, capsys, command):
    """`runs/NAME` (config.json of the run, best.pt, last.pt) is not a saved model: each command says which file to
    pass, in one line, rather than a KeyError from timm's config reader or advice to load it as a hub folder."""
    import json
    from ssod_zoo.app import cli
    from cli_helpers import make_checkpoint, save_images
    run = tmp_path / 'runs' / 'ssod'
    run.mkdir(parents=True)
    make_checkpoint(run / 'best.pt', threshold=0.5)
    (run / 'config.json').write_text(json.dumps({'epochs': 1, 'out_dir': str(run)}))
    images = save_images(tmp_path / 'images', 2)
    argv = {'predict': [str(run), str(images)],
            'calibrate': [str(run), '--val-dir', str(images), '--out', str(tmp_path / 'cal')],
            'save': [str(run), str(tmp_path / 'hub')], 'export': [str(run), '--out', str(tmp_path / 'm.onnx')]}
    with pytest.raises(SystemExit) as e:
        cli.main([command, *argv[command]])
    # ssod export exits with its message (Python prints it, status 1); the others print it and exit 2
    err = [e.value.code] if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()
    said = f'{run} is a training run (ssod train --out-dir), not a saved model: pass its checkpoint, {run / "best.pt"}'
    assert e.value.code in (2, err[0]) and len(err) == 1 and said in err[0], err


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    """Ctrl-C during a command (an eval's scoring, a predict) ends it with one line and status 130, not the
    traceback of wherever the work was."""
    from ssod_zoo.app import cli, evaluate

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, 'main', interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main(['eval', '--no-plots'])
    assert e.value.code == 130 and capsys.readouterr().err == 'ssod eval: interrupted\n'


def test_release_without_a_protocol_says_what_releases_a_folder_run(tmp_path, capsys):
    from ssod_zoo.app import release
    with pytest.raises(SystemExit) as e:
        release.main([str(tmp_path / 'run'), str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and '--protocol is required' in err and '`ssod save RUN/best.pt DIR`' in err


def test_eval_matches_the_fit_folders_by_name_too(two_class_folders, tmp_path, monkeypatch):
    """--fit-dir's class folders get the model's class order as the ID set's do (the per-class fits: KNN's k cap,
    Mahalanobis's class means)."""
    from collections import Counter

    from cli_helpers import save_images
    from ssod_zoo.app import evaluate
    from ssod_zoo.app.report import fit_detectors
    for seed, (name, n) in enumerate((('a', 3), ('b', 5))):
        save_images(tmp_path / 'fit' / name, n, seed=seed, size=64)
    counts = []
    monkeypatch.setattr(evaluate, 'fit_detectors', lambda features, targets, *args, **kwargs: (
        counts.append(Counter(targets.tolist())), fit_detectors(features, targets, *args, **kwargs))[1])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # fits this small are flagged
        two_class_folders('hub_ba', '--fit-dir', str(tmp_path / 'fit'))
    assert counts == [Counter({1: 3, 0: 5})]  # a/ is the model's class 1 ('b', 'a'); ImageFolder alone says 0
