"""`ssod train` as a user meets it (issue 13, item 3): help and defaults, small data, readable output, resume."""
import dataclasses
import os

import pytest
import timm
import torch

from ssod_zoo.app import train as train_mod
from ssod_zoo.app.train import HELP, TrainConfig, TrainError, main

from cli_helpers import class_tree, make_checkpoint


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    return {'train': class_tree(root / 'train', 4), 'val': class_tree(root / 'val', 2, seed=5)}


def _args(tiny, out, *extra):
    return ['--model', 'ssod_test_resnet', '--model-kwargs', 'output_stride=16', '--train-dir', str(tiny['train']),
            '--val-dir', str(tiny['val']), '--ood-dirs', str(tiny['val'] / 'cat'), '--img-size', '32',
            '--batch-size', '4', '--workers', '0', '--epochs', '1', '--out-dir', str(out), *extra]


def test_every_flag_has_help_and_shows_its_default(capsys):
    assert set(HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    parser = train_mod.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest != 'help':
            assert action.help and '%(default)' in formatter._get_help_string(action), action.option_strings
    with pytest.raises(SystemExit):
        train_mod.parse_args(['--help'])
    text = capsys.readouterr().out
    assert '(default: ssod_resnet50)' in text and '(default: 0.0001)' in text


def test_the_defaults_are_the_papers_recipe():
    """README: "Defaults are the paper's (Appendix A.4)": 224 px, AdamW from lr 1e-4 halved every 30 epochs, a
    global batch of 256 (32 x 8 GPUs); gamma 0.95, alpha 1.0 and loss-wise balance (sections 2.3 and 3), the
    paper's OOD cutoff, no exposure and no warm-up (SSOD from the first step). Written out here from the paper."""
    cfg = TrainConfig()
    assert (cfg.img_size, cfg.lr, cfg.lr_step, cfg.lr_gamma, cfg.batch_size) == (224, 1e-4, 30, 0.5, 256)
    assert (cfg.gamma, cfg.alpha, cfg.balance, cfg.ood_rule, cfg.exposure) == (0.95, 1.0, 'lwb', 'paper', 0.0)
    assert (cfg.warmup_epochs, cfg.ce_only, cfg.ood_detach, cfg.label_smoothing) == (0, False, False, 0.0)
    assert isinstance(train_mod._optimizer(timm.create_model('ssod_test_resnet', num_classes=3), cfg),
                      torch.optim.AdamW)


def test_workers_default_fits_the_machine():
    assert 1 <= TrainConfig().workers <= (os.cpu_count() or 1)


def test_batch_larger_than_the_training_set_names_the_flag(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_args(tiny, tmp_path, '--batch-size', '256'))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--batch-size 8' in err[0]  # 12 images: the largest power of two that fits


def test_ce_only_summary_has_no_ood_factor_fpr95():
    record = {'epoch': 1, 'train': {'loss': 1.0, 'img_s': 5.0}, 'ood_loss_on': False,
              'val': {'id_accuracy': 50.0, 'ood': {'x': {}}, 'ood_average': {'fpr95': 90.0, 'auroc': 50.0}}}
    assert 'FPR95' not in train_mod._summary(record)
    assert 'FPR95' in train_mod._summary({**record, 'ood_loss_on': True})


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import sys
    loader = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: False)  # piped to a file: the loader itself, no bar
    assert train_mod._progress(loader, True, 'epoch 1', 0, 3) is loader
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)  # a terminal: a bar over the same items
    bar = train_mod._progress(loader, True, 'epoch 1', 0, 3)
    assert bar is not loader and list(bar) == loader
    assert train_mod._progress(loader, False, 'epoch 1', 0, 3) is loader  # --no-progress


def test_init_with_another_class_count_says_so(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / 'c.pt', num_classes=3)
    model = timm.create_model('ssod_test_resnet', num_classes=2)
    train_mod._load_init(model, str(ckpt), num_classes=2)
    err = capsys.readouterr().err
    assert 'classifier has 3 classes, the data 2' in err and 'starts fresh' in err
    # another architecture's weights (wider features, the classifier too): refused, and no word of a class count
    wide = tmp_path / 'wide.safetensors'
    from safetensors.torch import save_file
    save_file(timm.create_model('resnet10t', num_classes=2).state_dict(), str(wide))
    with pytest.raises(TrainError, match=r'does not fit ssod_test_resnet: 6 missing \(e\.g\. layer3\.0\.conv3\.weight, .*\), '
                                         r'71 of another shape \(e\.g\. bn1\.bias, bn1\.running_mean\)$'):
        train_mod._load_init(model, str(wide), num_classes=2)
    assert 'classes' not in capsys.readouterr().err


def test_init_offline_fails_at_once_in_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'is_offline_mode', lambda: True)
    monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache', lambda *a, **k: None)
    with pytest.raises(TrainError, match='not in the Hugging Face cache and HF_HUB_OFFLINE is set') as e:
        train_mod._cached_hub_weights('resnet18.a1_in1k')
    assert '\n' not in str(e.value) and 'local weights file' in str(e.value)


@pytest.mark.parametrize('name', ['nope.pth', 'weights/nope'])
def test_init_naming_a_missing_file_says_so(name, tmp_path):
    model = timm.create_model('ssod_test_resnet', num_classes=2)
    with pytest.raises(TrainError, match=r'--init .*nope.*: no such file or folder') as e:
        train_mod._load_init(model, str(tmp_path / name), num_classes=2)
    assert 'hf-hub:' in str(e.value) and 'Use' not in str(e.value)  # not timm's "Use 'hf-hub:...'" hint


def test_a_second_run_into_the_same_out_dir_needs_resume(tiny, tmp_path, capsys):
    """Without --resume it would append to log.jsonl and replace best.pt with another run's."""
    main(_args(tiny, tmp_path))
    log, best = (tmp_path / 'log.jsonl').read_text(), (tmp_path / 'best.pt').read_bytes()
    with pytest.raises(SystemExit) as e:
        main(_args(tiny, tmp_path, '--seed', '5'))
    assert e.value.code == 2
    assert 'already holds a run (last.pt): continue it with --resume auto, or give a new --out-dir' in \
        capsys.readouterr().err
    assert (tmp_path / 'log.jsonl').read_text() == log and (tmp_path / 'best.pt').read_bytes() == best


def test_resume_of_a_finished_run_and_with_changed_flags(tiny, tmp_path, capsys):
    main(_args(tiny, tmp_path, '--lr', '1e-3'))
    capsys.readouterr()
    out = main(_args(tiny, tmp_path, '--lr', '1e-3', '--resume', 'auto'))
    assert out.get('finished') and 'already finished' in capsys.readouterr().out
    # the architecture's arguments too (a ResNet's weights load at any output stride: nothing else would say so)
    main(_args(tiny, tmp_path, '--epochs', '2', '--lr', '5e-2', '--resume', 'auto', '--model-kwargs', 'output_stride=8'))
    err = capsys.readouterr().err
    assert "--model-kwargs ['output_stride=16'] (asked ['output_stride=8'])" in err and '--lr 0.001 (asked 0.05)' in err
    ckpt = torch.load(tmp_path / 'last.pt', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['config']['lr'] == 1e-3  # records what the run used
    assert ckpt['model_args']['output_stride'] == 16 and ckpt['config']['model_kwargs'] == ['output_stride=16']


def test_a_feature_map_of_a_few_positions_gets_a_warning(capsys):
    """At 32 px test_resnet's map is 1x1: nothing for Eq. 12 to sample as background. The warning names the size
    and both ways out; the shipped weights' setting (96 px, output stride 16, a 6x6 map) gets none."""
    import timm
    cfg = TrainConfig(model='ssod_test_resnet', img_size=32)
    model = timm.create_model('ssod_test_resnet', num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, 'input_size': (3, 32, 32)}
    train_mod._warn_small_map(model, cfg)
    err = capsys.readouterr().err
    assert 'at 32x32 px ssod_test_resnet gives a 1x1 feature map' in err
    assert '--img-size' in err and 'output_stride=16' in err and model.training
    model = timm.create_model('ssod_test_resnet', num_classes=3, output_stride=16)
    model.pretrained_cfg = {**model.pretrained_cfg, 'input_size': (3, 96, 96)}
    train_mod._warn_small_map(model, cfg)
    assert capsys.readouterr().err == ''
    # MobileNetV3 has no output_stride: only the size, with the one that gives a 3x3 map at its stride of 32
    model = timm.create_model('ssod_mobilenetv3_large_100', num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, 'input_size': (3, 64, 64)}
    train_mod._warn_small_map(model, TrainConfig(model='ssod_mobilenetv3_large_100', img_size=64))
    err = capsys.readouterr().err
    assert 'gives a 2x2 feature map' in err and 'output_stride' not in err
    side = int(err.split('(at least ')[1].split(' ')[0])  # measured, and the smallest such size in steps of 8
    positions = [model.eval().forward_features(torch.zeros(1, 3, n, n)).shape[-2:].numel() for n in (side - 8, side)]
    assert positions[0] < 9 <= positions[1] and f'(at least {side} for 9 positions)' in err


def test_a_model_argument_the_architecture_does_not_take_is_one_line(tmp_path):
    cfg = TrainConfig(model='ssod_mobilenetv3_large_100', model_kwargs=['output_stride=16'])
    with pytest.raises(TrainError, match=r"--model-kwargs output_stride=16: ssod_mobilenetv3_large_100 does not take "
                                         r"it \(.*unexpected keyword argument 'output_stride'"):
        train_mod._model(cfg, 3)


@pytest.mark.parametrize('name', ['test_vit', 'ssod_test_vit'])
def test_a_model_that_is_not_a_cnn_is_one_line(name):
    with pytest.raises(TrainError, match=rf'^--model {name}: VisionTransformer is not a CNN SSOD can use: .*Use a CNN'):
        train_mod._model(TrainConfig(model=name), 3)


def test_any_timm_cnn_trains_by_its_ssod_name():
    assert type(train_mod._model(TrainConfig(model='ssod_test_byobnet'), 3)).__name__ == 'SSODByobNet'
    with pytest.raises(TrainError, match=r"^unknown model 'ssod_no_such_net': give one of ssod_.*, or any timm CNN"):
        train_mod._model(TrainConfig(model='ssod_no_such_net'), 3)


def test_each_rank_seeds_its_steps_with_its_own_rank(tiny, tmp_path, monkeypatch):
    """Under DDP the ranks must not draw the same dropout masks: a step's seed takes the process's RANK."""
    seen = []
    real = train_mod._step_seed
    monkeypatch.setattr(train_mod, '_step_seed', lambda *a: seen.append(a) or real(*a))
    monkeypatch.setenv('RANK', '1')  # (one process: what rank 1 of a DDP run computes, without the process group)
    main(_args(tiny, tmp_path / 'run', '--seed', '7', '--max-steps-per-epoch', '2', '--no-progress'))
    assert seen == [(7, 0, 0, 1), (7, 0, 1, 1)]


def test_val_classes_unlike_the_training_ones_are_named(tiny, tmp_path, capsys):
    """The message names the class folders that differ, not a truncated pair of lists."""
    import shutil
    val = shutil.copytree(tiny['val'], tmp_path / 'val')
    shutil.rmtree(val / 'cat')
    (val / 'dog').rename(val / 'wolf')
    with pytest.raises(SystemExit):
        main(_args(tiny, tmp_path / 'run', '--val-dir', str(val)))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ('ssod train: error: --val-dir and --train-dir must have the same class folders: --val-dir '
                       'lacks cat, dog; has wolf that --train-dir has not (2 against 3 classes)'), err
