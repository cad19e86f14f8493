"""The commands users run most, through the ``ssod`` entry point: ``ssod eval`` and ``ssod demo --quick``.

Each checks the files the command promises (images that PIL can read back as PNG) and recomputes one of the
reported metrics directly from the model (its own ``forward_ssod``, not the commands' scoring code; AUROC by
scikit-learn), so a table that merely has the right shape cannot pass.
"""
import csv
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder

from ssod_zoo import load_model, scores
from ssod_zoo.app.cli import COMMANDS, main as ssod
from ssod_zoo.hub import CHECKPOINT_FORMAT, load_checkpoint
from ssod_zoo.metrics import ood_metrics

CLASSES = ['amber', 'cobalt', 'moss']
COLOURS = [(200, 120, 30), (40, 70, 200), (60, 160, 60)]
SIZE = 64


def _assert_png(path: Path) -> None:
    assert path.is_file(), f'{path.name} was not written'
    with Image.open(path) as image:
        assert image.format == 'PNG'
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) >= 100, f'{path.name} is {image.size}'


def _write_images(folder: Path, count: int, colour, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(colour, dtype=torch.float32).view(1, 1, 3)
    for i in range(count):
        noise = torch.randn(SIZE, SIZE, 3, generator=g) * 40
        pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f'{i:03d}.png')


def _checkpoint(path: Path, seed: int, ce_only: bool = False) -> Path:
    """A training checkpoint (the format `ssod train` writes) of a small randomised SSOD model; ``ce_only``: as
    `ssod train --ce-only` records a cross-entropy model (its OOD head never trained)."""
    torch.manual_seed(seed)
    model = timm.create_model('ssod_test_resnet', num_classes=len(CLASSES)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    data_config = {'input_size': (3, SIZE, SIZE), 'crop_pct': 1.0, 'interpolation': 'bilinear',
                   'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}
    torch.save({'format': CHECKPOINT_FORMAT, 'architecture': 'ssod_test_resnet',
                'model_args': {'num_classes': len(CLASSES)}, 'model': model.state_dict(), 'ood_threshold': 0.5,
                'class_names': CLASSES, 'config': {'img_size': SIZE, 'crop_pct': 1.0, 'ce_only': ce_only},
                'metrics': {}, 'data_config': data_config}, path)
    return path


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval_data')
    for split, count, seed in (('val', 6, 0), ('fit', 8, 1)):
        for c, (name, colour) in enumerate(zip(CLASSES, COLOURS)):
            _write_images(root / split / name, count, colour, seed * 10 + c)
    _write_images(root / 'ood' / 'grey', 10, (128, 128, 128), 20)  # flat folders: every image is OOD
    _write_images(root / 'ood' / 'purple', 10, (150, 40, 160), 21)
    return root


def _scores_of(spec, folder: Path, labelled: bool):
    """One process, the model's own preprocessing: what ``ssod eval`` should have scored."""
    model = load_model(spec)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    if labelled:
        ds = ImageFolder(folder, transform=transform)
    else:
        files = sorted(folder.rglob('*.png'))
        ds = [(transform(Image.open(f).convert('RGB')), 0) for f in files]
    return _forward(model, DataLoader(ds, batch_size=8))


@torch.no_grad()
def _forward(model, loader) -> dict:
    """The model's own outputs, batch by batch: logits, OOD factor and the labels."""
    parts = [(model.forward_ssod(x), y) for x, y in loader]
    return {'logits': torch.cat([o.logits for o, _ in parts]),
            'ood_factor': torch.cat([o.ood_factor for o, _ in parts]), 'targets': torch.cat([y for _, y in parts])}


def _auroc(id_scores, ood_scores) -> float:
    """scikit-learn's AUROC, ID positive, in percent."""
    return 100 * roc_auc_score([1] * len(id_scores) + [0] * len(ood_scores), torch.cat([id_scores, ood_scores]))


@pytest.mark.filterwarnings('ignore:.*(unreliable|from another class).*:UserWarning')  # a tiny fit set, on purpose
@pytest.mark.filterwarnings('ignore:.*OOD head was never trained.*:UserWarning')  # the CE model's, read by hand
def test_ssod_eval_on_a_folder_with_two_checkpoints(folders, tmp_path, capsys):
    ssod_ckpt = _checkpoint(tmp_path / 'ssod.pt', seed=0)
    ce_ckpt = _checkpoint(tmp_path / 'ce.pt', seed=1, ce_only=True)
    out = tmp_path / 'out'
    ssod(['eval', '--model', str(ssod_ckpt), '--baseline-model', str(ce_ckpt), '--val-dir', str(folders / 'val'),
          '--ood-dirs', str(folders / 'ood' / 'grey'), str(folders / 'ood' / 'purple'),
          '--fit-dir', str(folders / 'fit'), '--out', str(out), '--batch-size', '8', '--workers', '0',
          '--device', 'cpu', '--bootstrap', '20'])
    results = json.loads((out / 'results.json').read_text())
    for name in ('roc.png', 'histograms.png'):
        _assert_png(out / name)
    markdown = (out / 'results.md').read_text()
    assert 'grey' in markdown and 'purple' in markdown and 'FPR95' in markdown

    # both models were used: ID accuracy of each, and the baselines fitted on --fit-dir
    assert set(results['id_accuracy']) == {'ssod', 'ce'}
    assert set(results['ood']) == {'grey', 'purple', 'average'}
    methods = set(results['ood']['average'])
    assert {'ssod', 'msp', 'energy', 'odin', 'knn', 'mahalanobis', 'vim', 'react'} <= methods
    # how the baselines ran, beside the table: KNN's k capped below the smallest fit class (8 images), ODIN's units
    assert results['detectors']['knn'].startswith('KNN(k=7, ') and '`knn` KNN(k=7, ' in markdown
    assert results['detectors']['odin'] == 'ODIN(temperature=1000.0, epsilon=0.0014) (step / std)'

    # recomputed here: the SSOD row from --model's OOD factor, MSP from --baseline-model's logits
    id_ssod, id_ce = (_scores_of(c, folders / 'val', labelled=True) for c in (ssod_ckpt, ce_ckpt))
    ood_ssod, ood_ce = (_scores_of(c, folders / 'ood' / 'purple', labelled=False) for c in (ssod_ckpt, ce_ckpt))
    expected_ssod = ood_metrics(id_ssod['ood_factor'], ood_ssod['ood_factor'])
    expected_msp = ood_metrics(scores.msp(id_ce['logits']), scores.msp(ood_ce['logits']))
    for key in ('fpr95', 'auroc'):
        assert results['ood']['purple']['ssod'][key] == pytest.approx(100 * expected_ssod[key], abs=1e-6), key
        assert results['ood']['purple']['msp'][key] == pytest.approx(100 * expected_msp[key], abs=1e-6), key
    assert results['ood']['purple']['ssod']['auroc'] == pytest.approx(
        _auroc(id_ssod['ood_factor'], ood_ssod['ood_factor']), abs=1e-4)
    accuracy = 100 * (id_ce['logits'].argmax(1) == id_ce['targets']).float().mean().item()
    assert results['id_accuracy']['ce'] == pytest.approx(accuracy)
    # ODIN, the one baseline that needs the images and a gradient, written out here (Liang et al.: T = 1000,
    # eps = 0.0014 in pixel units) on --baseline-model: every image's score, as scores.csv holds it
    odin = {name: _odin_by_hand(ce_ckpt, folders / sub, labelled) for name, sub, labelled in
            (('id', 'val', True), ('purple', 'ood/purple', False))}
    with open(out / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    for name, want in odin.items():
        got = torch.tensor([float(r['odin']) for r in rows if r['set'] == name], dtype=torch.float64)
        assert torch.allclose(got, want.double(), rtol=0, atol=1e-9), (name, (got - want.double()).abs().max())
    expected_odin = ood_metrics(odin['id'], odin['purple'])
    assert results['ood']['purple']['odin']['auroc'] == pytest.approx(100 * expected_odin['auroc'], abs=1e-4)


def _odin_by_hand(spec, folder: Path, labelled: bool, temperature=1000.0, eps=0.0014):
    model = load_model(spec).float()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    files = sorted(folder.rglob('*.png')) if not labelled else [p for p, _ in ImageFolder(folder).samples]
    x = torch.stack([transform(Image.open(f).convert('RGB')) for f in files]).requires_grad_(True)
    log_msp = (model(x).logits / temperature).log_softmax(1).max(1).values
    log_msp.sum().backward()
    std = torch.tensor(model.pretrained_cfg['std']).view(1, 3, 1, 1)  # eps in pixel units, as the paper's code
    with torch.no_grad():
        return (model(x + eps * x.grad.sign() / std).logits / temperature).softmax(1).max(1).values


def test_ssod_eval_without_fit_dir_leaves_the_fitted_baselines_out(folders, tmp_path):
    ckpt = _checkpoint(tmp_path / 'ssod.pt', seed=0)
    with pytest.warns(UserWarning, match='no --fit-dir, so .*knn.* are left out .*pass --fit-dir'):
        ssod(['eval', '--model', str(ckpt), '--val-dir', str(folders / 'val'), '--ood-dirs',
              str(folders / 'ood' / 'grey'), '--out', str(tmp_path / 'out'), '--batch-size', '8', '--workers', '0',
              '--device', 'cpu', '--no-plots', '--bootstrap', '0'])
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    methods = set(results['ood']['average'])
    assert 'msp' in methods and not methods & {'knn', 'mahalanobis', 'vim', 'react'}
    left_out = [line for line in (tmp_path / 'out' / 'results.md').read_text().splitlines() if 'Left out' in line]
    assert len(left_out) == 1 and all(m in left_out[0] for m in ('react', 'knn', 'mahalanobis', 'vim'))
    assert set(results['id_accuracy']) == {'ssod'}  # no --baseline-model: one model
    assert not (tmp_path / 'out' / 'roc.png').exists()


def test_demo_quick_end_to_end(tmp_path):
    """The README's main job, in its quick form: every promised file, and one metric recomputed."""
    out = tmp_path / 'demo'
    ssod(['demo', '--quick', '--out', str(out), '--no-progress', '--workers', '0'])
    results = json.loads((out / 'results.json').read_text())
    assert (out / 'results.md').read_text().strip()
    for name in ('roc.png', 'histograms.png', 'sampler.png'):
        _assert_png(out / name)
    for name in ('ssod', 'ce'):
        folder = out / 'models' / name
        assert {'config.json', 'model.safetensors', 'README.md'} <= {p.name for p in folder.iterdir()}, name

    # the published SSOD model is the one scored: its threshold and one metric, recomputed from its outputs
    model = load_model(out / 'models' / 'ssod')
    assert model.ood_threshold == pytest.approx(results['config']['thresholds']['ssod'])
    assert model.spatial_threshold == pytest.approx(results['config']['thresholds']['ssod_spatial_top3'])
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    folder = lambda *parts: DataLoader(ImageFolder(out.joinpath('benchmark', *parts), transform=transform),  # noqa
                                       batch_size=128)
    val = _forward(model, folder('id', 'val'))
    ood_set = next(s for s in results['ood'] if s != 'average')
    ood = _forward(model, folder('ood', ood_set))
    expected = ood_metrics(val['ood_factor'], ood['ood_factor'])
    for key in ('fpr95', 'auroc'):
        assert results['ood'][ood_set]['ssod'][key] == pytest.approx(100 * expected[key], abs=1e-6), key
    assert results['ood'][ood_set]['ssod']['auroc'] == pytest.approx(_auroc(val['ood_factor'], ood['ood_factor']),
                                                                     abs=1e-4)
    assert results['id_accuracy']['ssod'] == pytest.approx(
        100 * (val['logits'].argmax(1) == val['targets']).float().mean().item())


def test_demo_evaluates_the_shipped_models_by_default(tmp_path):
    """Without --retrain the demo scores the shipped SSOD model and CE twin (weights/demo), publishes exactly those,
    and reports the study's readout on both models."""
    from ssod_zoo.app.demo import SHIPPED_MODELS
    out = tmp_path / 'demo'
    ssod(['demo', '--out', str(out), '--train-per-class', '4', '--val-per-class', '6', '--ood-per-set', '10',
          '--no-progress', '--workers', '0'])
    results = json.loads((out / 'results.json').read_text())
    assert results['config']['models'].startswith('shipped')
    assert not (out / 'runs').exists()  # nothing trained
    assert {'ssod_spatial_top3', 'maxlogit_spatial_top3', 'ssod'} <= set(results['ood']['average'])
    for name in ('ssod', 'ce'):
        shipped, published = load_model(SHIPPED_MODELS / name), load_model(out / 'models' / name)
        assert (published.ood_threshold, published.spatial_threshold) == (shipped.ood_threshold,
                                                                          shipped.spatial_threshold)
        # and says what the thresholds were calibrated on: the shipped folder's calibration set, not id/val
        assert json.loads((out / 'models' / name / 'config.json').read_text())['calibration'] == json.loads(
            (SHIPPED_MODELS / name / 'config.json').read_text())['calibration']
        for k, v in shipped.state_dict().items():
            assert torch.equal(published.state_dict()[k], v), (name, k)
    recipe = json.loads((SHIPPED_MODELS / 'recipe.json').read_text())
    assert results['config']['train'] == recipe['models']['ssod']['config']
    # what README promises beside the table: per-image scores, accept rates at the threshold, intervals
    with open(out / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 * 6 + 3 * 10 and {'ssod', 'ssod_spatial_top3', 'odin'} <= set(rows[0])
    id_rows = [r for r in rows if r['set'] == 'id']
    thresholds = results['thresholds']
    assert thresholds == results['config']['thresholds'] and None not in thresholds.values()
    for method in ('ssod', 'ssod_spatial_top3'):  # both deployed readouts, each at its own threshold
        assert results['accept_rates'][method]['id']['accepted'] == pytest.approx(
            100 * sum(float(r[method]) >= thresholds[method] for r in id_rows) / len(id_rows))
    assert set(results['ci']) == set(results['ood']) - {'average'}
    lo, hi = results['ci']['near']['ssod']['fpr95']
    assert lo <= results['ood']['near']['ssod']['fpr95'] <= hi
    md = (out / 'results.md').read_text()
    assert 'Accepted %' in md and '95% CI' in md
    card = (out / 'models' / 'ce' / 'README.md').read_text()
    assert 'never trained' in card and 'model.spatial_threshold = ' in card and 'model.ood_threshold' not in card


def test_demo_retrain_starts_both_runs_from_the_shipped_init(tmp_path):
    """``--retrain`` as the README runs it (not ``--quick``, which trains from scratch): both runs load the shipped
    cross-entropy init and start the SSOD loss at once. At learning rate 0 every parameter that the init holds
    must come out exactly as it went in, in both models."""
    from safetensors.torch import load_file
    from ssod_zoo.app.demo import SHIPPED_INIT
    out = tmp_path / 'demo'
    ssod(['demo', '--retrain', '--ssod-epochs', '1', '--lr', '0', '--train-per-class', '4', '--val-per-class', '4',
          '--ood-per-set', '8', '--batch-size', '8', '--no-progress', '--workers', '0', '--out', str(out)])
    results = json.loads((out / 'results.json').read_text())
    assert results['config']['models'] == 'trained here (--retrain)'
    init = load_file(SHIPPED_INIT)
    for name, ce_only in (('ssod', False), ('ce', True)):
        model, ckpt = load_checkpoint(out / 'runs' / name / 'last.pt')
        assert (ckpt['config']['init'], ckpt['config']['warmup_epochs'], ckpt['config']['ce_only']) == (
            str(SHIPPED_INIT), 0, ce_only)
        weights = dict(model.named_parameters())
        loaded = [k for k in init if k in weights]
        assert 'fc.weight' in loaded and len(loaded) > 20, loaded
        for k in loaded:
            assert torch.equal(weights[k].detach(), init[k]), (name, k)


def test_demo_refuses_training_options_without_retrain(capsys):
    with pytest.raises(SystemExit):
        ssod(['demo', '--out', 'unused', '--ssod-epochs', '8'])
    assert '--ssod-epochs only apply to training: add --retrain' in capsys.readouterr().err


@pytest.mark.parametrize('command', list(COMMANDS))
def test_help_examples_keep_their_line_continuations(command, capsys):
    # a backslash-newline in a non-raw docstring joins the lines: the example would print as one line with a run
    # of spaces in it, and the shell continuation the user copies is gone
    with pytest.raises(SystemExit) as stop:
        ssod([command, '--help'])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert not re.search(r'\S {5,}--', out), out


@pytest.mark.filterwarnings('ignore:.*OOD head was never trained.*:UserWarning')
def test_baseline_rows_name_the_model_they_scored():
    """A baseline's rows and ID accuracy say which model it scored: a cross-entropy model (its OOD head never
    trained), another SSOD model, or, with no baseline model, the SSOD model itself."""
    from ssod_zoo.app.evaluate import evaluate, results_markdown
    from ssod_zoo.app.protocols import add_fpr95_openood, fpr95_markdown
    torch.manual_seed(0)
    model, ce, other = (timm.create_model('ssod_test_resnet', num_classes=2).eval() for _ in range(3))
    ce.ood_head_trained = False
    loader = DataLoader(TensorDataset(torch.randn(8, 3, SIZE, SIZE), torch.tensor([0, 1] * 4)), batch_size=8)
    for baseline, key, name in ((ce, 'ce', 'CE model'), (other, 'baseline', 'baseline SSOD model'),
                                (None, None, 'same model')):
        results = evaluate(model, loader, {'noise': loader}, baseline_model=baseline, methods=['ssod', 'msp'],
                           progress=False)
        assert list(results['id_accuracy']) == ['ssod', key][:2 if key else 1]
        table = results_markdown(results)
        assert f'| msp ({name}) |' in table and '| SSOD OOD factor, Eq. 15 (paper) |' in table, table
        assert ('CE model' in table) == (key == 'ce'), table
        assert f'| msp ({name}) |' in fpr95_markdown(add_fpr95_openood(results))  # results.md's second table


@pytest.mark.filterwarnings('ignore:.*OOD head was never trained.*:UserWarning')
def test_odin_in_evaluate_steps_in_pixel_units_unless_told_otherwise():
    """evaluate()'s ODIN divides its step by the baseline's std (the paper's units); odin_pixel_units=False keeps
    the study's (the step on the normalised images); a std that does not fit the images' channels is left out,
    with a warning, rather than stopping the run."""
    from ssod_zoo.app.evaluate import evaluate
    from ssod_zoo.scores import odin
    torch.manual_seed(0)
    model = timm.create_model('ssod_test_resnet', num_classes=2).eval()
    x = torch.randn(6, 3, SIZE, SIZE)
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 1] * 3)), batch_size=6)
    logits = lambda t: model.forward_head(model.forward_features(t))  # noqa: E731
    for pixel, std in ((True, model.pretrained_cfg['std']), (False, None)):
        got = evaluate(model, loader, {'same': loader}, methods=['odin'], progress=False, odin_pixel_units=pixel)
        torch.testing.assert_close(got['scores']['odin']['id'], odin(logits, x, std=std), rtol=0, atol=1e-7)
    gray = timm.create_model('ssod_test_resnet', num_classes=2, in_chans=1).eval()
    loader = DataLoader(TensorDataset(torch.randn(4, 1, SIZE, SIZE), torch.tensor([0, 1] * 2)), batch_size=4)
    with pytest.warns(UserWarning, match="std has 3 values for 1-channel images, so its step is taken in the "
                                         "images' own units"):
        evaluate(gray, loader, {'same': loader}, methods=['odin'], progress=False)


def test_report_without_bootstrap_has_no_empty_interval_table():
    from ssod_zoo.app.report import report_markdown
    accept = {'ssod_spatial_top3': {'id': {'n': 10, 'accepted': 96.0}, 'near': {'n': 10, 'accepted': 20.0}},
              'ssod': {'id': {'n': 10, 'accepted': 95.0}, 'near': {'n': 10, 'accepted': 40.0}}}
    thresholds = {'ssod_spatial_top3': 9.5, 'ssod': 0.5}
    ood = {'near': {'ssod': {'fpr95': 40.0, 'auroc': 80.0}}}
    without = report_markdown(accept, thresholds, {}, ood, n_boot=0, baseline='ce')
    assert '## FPR95 and AUROC' not in without and '| Method |' not in without
    assert '--bootstrap 0' in without and '| near | 10 | 20.0 | 40.0 |' in without
    assert '| Set | Images | Accepted %, `spatial_score` | Accepted %, `ood_factor` |' in without
    assert '`spatial_score >= 9.5` (`model.spatial_threshold`); `ood_factor >= 0.5`' in without
    # a readout without a threshold: its column goes, and the report says how to get one
    missing = report_markdown(accept, {**thresholds, 'ssod_spatial_top3': None}, {}, ood, n_boot=0, baseline='ce')
    assert '| near | 10 | 40.0 |' in missing and 'no calibrated `spatial_threshold` (`ssod calibrate`' in missing
    ci = {'near': {'ssod': {'fpr95': [30.0, 50.0], 'auroc': [75.0, 85.0]}}}
    with_ci = report_markdown(accept, thresholds, ci, ood, n_boot=100, baseline='ce')
    assert '(100 resamples, seed 0)' in with_ci
    # named as in the main table, with the key of its scores.csv column
    assert '| SSOD OOD factor, Eq. 15 (paper), `ssod` | 40.0 [30.0, 50.0] | 80.0 [75.0, 85.0] |' in with_ci
