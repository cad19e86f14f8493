"""Named protocols on real data: Fashion-MNIST from Debian's files, the missing-data messages of every protocol,
OpenOOD v1.5's image lists, both FPR95 conventions, and the release pipeline.

The real-data tests need Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist; .ci/run installs it
when it can) and are skipped, with that reason, where it is absent.
"""
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssod_zoo.app import evaluate, protocols, train
from ssod_zoo.app.protocols import DataMissing, load_protocol
from ssod_zoo.metrics import fpr95_ood_positive, fpr_at_tpr

from cli_helpers import bind_hfapi

FMNIST_ROOT = Path('/usr/share/datasets/fashion-mnist')
MANIFEST = json.loads((Path(__file__).resolve().parent.parent / 'weights' / 'manifest.json').read_text())
FMNIST_WEIGHT = next((e['name'] for e in MANIFEST['weights'] if e['metrics'].get('protocol') == 'fashion-mnist'),
                     None)

needs_fmnist = pytest.mark.skipif(
    not (FMNIST_ROOT / 'train-images-idx3-ubyte.gz').is_file(),
    reason=f'SKIPPED: Fashion-MNIST is not in {FMNIST_ROOT}: apt-get install dataset-fashion-mnist to run the '
           'real-data tests')


@pytest.fixture(scope='module')
def fmnist(tmp_path_factory):
    return load_protocol('fashion-mnist', str(FMNIST_ROOT), split='train',
                         cache=tmp_path_factory.mktemp('cache') / 'fashion-mnist')


# ------------------------------------------------------------------------------------------- Fashion-MNIST
@needs_fmnist
def test_fashion_mnist_splits_counts_labels_and_images(fmnist):
    assert fmnist.classes == ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Sneaker', 'Bag']
    per_val = protocols.FMNIST_VAL_PER_CLASS
    assert len(fmnist.test) == 6 * 1000 and len(fmnist.ood['fmnist_heldout']) == 4 * 1000
    assert len(fmnist.val) == 6 * per_val and len(fmnist.ood_val['fmnist_heldout']) == 4 * per_val
    assert len(fmnist.train) == 6 * (6000 - per_val) and fmnist.fit is not None
    # far-OOD that needs no download: the noise set, other draws for validation and test
    assert len(fmnist.ood_val['noise']) == 5 * protocols.FAR_PER_KIND['val']
    assert len(fmnist.ood['noise']) == 5 * protocols.FAR_PER_KIND['test']
    assert fmnist.ood_val['noise'].seed != fmnist.ood['noise'].seed
    # validation rows are never trained on, and the test split is untouched by both
    assert not set(fmnist.train.indices) & set(fmnist.val.indices)
    test_labels = fmnist.test.dataset.targets[fmnist.test.indices]
    assert sorted(torch.unique(test_labels).tolist()) == list(protocols.FMNIST_ID)
    held_out = fmnist.ood['fmnist_heldout']
    assert sorted(torch.unique(held_out.dataset.targets[held_out.indices]).tolist()) == list(protocols.FMNIST_OOD)
    for i in (0, 2999, 5999):
        image, label = fmnist.test[i]
        assert image.mode == 'RGB' and image.size == (28, 28)
        assert fmnist.classes[label] == protocols.FMNIST_CLASSES[int(test_labels[i])]
    assert np.bincount([fmnist.test[i][1] for i in range(0, 6000, 7)]).size == 6
    assert held_out[0][1] == -1
    # offline here: MNIST/KMNIST are not under the Debian root, so they are listed as skipped, with the reason
    for name in ('mnist', 'kmnist'):
        assert name in fmnist.ood or ('--download' in fmnist.skipped[name] and 'raw' in fmnist.skipped[name])


def test_synthetic_far_images_are_the_kinds_named_and_the_same_on_every_call():
    """``SyntheticFar``: each kind in its block, grey RGB at the size asked, image i fixed by (seed, i), another
    seed other images; blank frames are flat, OE's blobs are mostly black, Rademacher pixels are 0 or 255."""
    far = protocols.SyntheticFar(per_kind=4, seed=0)
    assert len(far) == 20 and far.targets == [-1] * 20
    assert [far.kind(i) for i in range(0, 20, 4)] == list(protocols.FAR_KINDS)
    pixels = {}
    for i in range(len(far)):
        image, label = far[i]
        assert image.mode == 'RGB' and image.size == (28, 28) and label == -1
        a = np.asarray(image)
        assert (a == a[..., :1]).all()  # grey
        pixels.setdefault(far.kind(i), []).append(a[..., 0])
    assert all(np.ptp(a) == 0 for a in pixels['constant']) and len({int(a[0, 0]) for a in pixels['constant']}) == 4
    assert all(set(np.unique(a)) <= {0, 255} for a in pixels['rademacher'])
    assert all((a == 0).mean() > 0.5 for a in pixels['blobs']) and all(a.max() > 190 for a in pixels['blobs'])
    for kind in ('uniform', 'gaussian'):
        assert all(60 < a.std() < 90 if kind == 'uniform' else 50 < a.std() < 70 for a in pixels[kind])
    again, other = protocols.SyntheticFar(4, 0), protocols.SyntheticFar(4, 1)
    assert all((np.asarray(far[i][0]) == np.asarray(again[i][0])).all() for i in range(20))
    assert not any((np.asarray(far[i][0]) == np.asarray(other[i][0])).all() for i in range(20))
    with pytest.raises(IndexError):
        far[20]


@needs_fmnist
def test_fashion_mnist_reads_the_torchvision_layout_too(fmnist, tmp_path):
    """A root with torchvision's uncompressed FashionMNIST/raw/ files is read in place (no cache copy)."""
    raw = tmp_path / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    cached = Path(fmnist.test.dataset.raw_folder)
    for f in protocols._IDX_FILES:
        (raw / f).symlink_to(cached / f)
    data = load_protocol('fashion-mnist', str(tmp_path), cache=tmp_path / 'unused')
    assert len(data.test) == 6000 and not (tmp_path / 'unused').exists()


@needs_fmnist
@pytest.mark.skipif(FMNIST_WEIGHT is None, reason='SKIPPED: no fashion-mnist weight in weights/manifest.json yet')
def test_protocol_end_to_end_with_the_shipped_weights(fmnist, tmp_path, capsys):
    """`ssod eval --protocol fashion-mnist` on a slice of the test images with the shipped ssod_resnet18 weights:
    both FPR95 conventions in results.json and results.md, the skipped far-OOD sets listed with their reason."""
    payload = evaluate.main(['--model', FMNIST_WEIGHT, '--protocol', 'fashion-mnist', '--data-root', str(FMNIST_ROOT),
                             '--limit', '48', '--fit-limit', '64', '--out', str(tmp_path), '--no-plots',
                             '--workers', '0', '--device', 'cpu'])
    heldout = payload['ood']['fmnist_heldout']
    assert payload['id_accuracy']['ssod'] >= 80.0  # 48 test images; the card: 91.40 on 1,000
    # both conventions, from the per-image scores the run wrote (the convention itself: the next test)
    import csv
    with open(tmp_path / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    # each row names its image in the data set it comes from, and an ID row's label is that image's there
    labels = fmnist.test.dataset.targets
    for r in rows:
        source, index = re.fullmatch(r'(FashionMNIST\(test\)|SyntheticFar\(seed \d+\))\[(\d+)\].*', r['path']).groups()
        if r['set'] == 'id':
            assert protocols.FMNIST_ID[int(r['target'])] == int(labels[int(index)])
        assert source.startswith('Synthetic') == (r['set'] == 'noise')
    for method in ('ssod', 'msp', 'energy', 'knn', 'vim'):
        id_s, ood_s = ([float(r[method]) for r in rows if r['set'] == name] for name in ('id', 'fmnist_heldout'))
        assert heldout[method]['fpr95_openood'] == pytest.approx(100 * fpr95_ood_positive(id_s, ood_s), abs=1e-6)
        assert heldout[method]['fpr95'] == pytest.approx(100 * fpr_at_tpr(id_s, ood_s), abs=1e-6)
    assert heldout['ssod']['auroc'] > 50.0  # better than chance (61.68 on 1,000 + 1,000)
    md = (tmp_path / 'results.md').read_text()
    assert 'FPR95 OpenOOD' in md and 'FPR95 paper' in md
    assert all(name in md for name in payload['config']['skipped'])
    err = capsys.readouterr().err  # and on the console, as they are skipped
    assert all(f'ssod eval: skipping {name}: ' in err for name in payload['config']['skipped'])


def test_openood_fpr95_is_ood_positive_per_set_and_averaged():
    """``fpr95_openood`` is OpenOOD's point, fpr[argmax(tpr >= 0.95)] on roc_curve(is_ood, -score) (scikit-learn
    as the oracle), per set and as the mean over the sets; the paper's ``fpr95`` is left as it was."""
    from sklearn.metrics import roc_curve
    rng = np.random.default_rng(0)
    scores = {'id': rng.normal(1.0, 1.0, 300), 'near': rng.normal(0.3, 1.0, 200), 'far': rng.normal(-1.0, 0.7, 250)}
    results = {'ood': {s: {'ssod': {'fpr95': 12.3}} for s in ('near', 'far', 'average')},
               'scores': {'ssod': {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()}}}
    protocols.add_fpr95_openood(results)
    expected = {}
    for s in ('near', 'far'):
        y = np.r_[np.zeros(300), np.ones(len(scores[s]))]
        fpr, tpr, _ = roc_curve(y, -np.r_[scores['id'], scores[s]].astype(np.float32))
        expected[s] = 100 * fpr[np.argmax(tpr >= 0.95)]
        assert results['ood'][s]['ssod']['fpr95_openood'] == pytest.approx(expected[s], abs=1e-6)
        assert results['ood'][s]['ssod']['fpr95'] == 12.3
    assert expected['near'] != pytest.approx(expected['far'])  # the sets differ, so a mix-up of sets shows
    assert results['ood']['average']['ssod']['fpr95_openood'] == pytest.approx((expected['near'] + expected['far']) / 2)


# ------------------------------------------------------------------------------------- missing-data messages
def _one_line(message: str) -> None:
    assert '\n' not in message and 'Traceback' not in message


@pytest.mark.parametrize('name, expect', [
    ('fashion-mnist', ('FashionMNIST', 'dataset-fashion-mnist')),
    ('cifar10', ('CIFAR-10', 'cifar-10-batches-py', '--download')),
    ('imagenet', ('ImageNet val', 'imagenet/val', 'image-net.org')),
])
def test_missing_data_is_one_line_naming_the_set_the_path_and_the_remedy(name, expect, tmp_path):
    with pytest.raises(DataMissing) as e:
        load_protocol(name, str(tmp_path / 'empty'))
    message = str(e.value)
    _one_line(message)
    assert str(tmp_path / 'empty') in message
    for text in expect:
        assert text in message


@pytest.mark.parametrize('installed', [True, False])
def test_missing_fashion_mnist_points_at_debians_copy_where_it_is_installed(installed, tmp_path, monkeypatch):
    debian = tmp_path / 'debian'
    if installed:
        debian.mkdir()
        (debian / 'train-images-idx3-ubyte.gz').write_bytes(b'')
    monkeypatch.setattr(protocols, 'DEBIAN_FMNIST', debian)
    with pytest.raises(DataMissing) as e:
        load_protocol('fashion-mnist', str(tmp_path / 'empty'))
    expected = (f"dataset-fashion-mnist is installed: pass --data-root {debian}" if installed else
                'apt-get install dataset-fashion-mnist')
    assert expected in str(e.value)


def test_missing_openood_lists_name_the_download_script(tmp_path):
    with pytest.raises(DataMissing) as e:
        load_protocol('cifar10', openood_root=str(tmp_path))
    _one_line(str(e.value))
    assert 'benchmark_imglist/cifar10/test_cifar10.txt' in str(e.value) and 'download.py' in str(e.value)


@pytest.mark.parametrize('command, argv', [
    (evaluate.main, ['--model', 'no_such_model', '--protocol', 'cifar10']),
    (train.main, ['--model', 'ssod_test_resnet', '--data', 'imagenet']),
])
def test_cli_reports_missing_data_in_one_line_before_any_work(command, argv, tmp_path, capsys):
    """One line on stderr, exit status 2, and nothing loaded first (the model name here does not even exist)."""
    if command is train.main:
        argv = [*argv, '--out-dir', str(tmp_path / 'run')]
    with pytest.raises(SystemExit) as e:
        command([*argv, '--data-root', str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and ': error: ' in err and str(tmp_path) in err


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_imagenet_present_sets_run_and_missing_ones_are_listed_as_skipped(tmp_path):
    for c in ('n01', 'n02'):
        _png(tmp_path / 'imagenet' / 'val' / c / 'a.png')
    _png(tmp_path / 'iNaturalist' / 'images' / 'x.jpg')
    data = load_protocol('imagenet', str(tmp_path))
    assert data.classes == ['n01', 'n02'] and len(data.test) == 2
    assert list(data.ood) == ['inaturalist'] and data.ood['inaturalist'][0][1] == -1
    assert set(data.skipped) == {'fit', 'sun', 'places', 'textures'}
    for reason in data.skipped.values():
        _one_line(reason)
    assert str(tmp_path / 'SUN') in data.skipped['sun'] and 'large_scale_ood' in data.skipped['sun']


# ------------------------------------------------------------------------------------------------ OpenOOD
CIFAR_CLASSES = protocols.OPENOOD['cifar10']['classes']


@pytest.fixture
def openood_root(tmp_path):
    """OpenOOD v1.5's data/ layout: benchmark_imglist/cifar10/*.txt naming images under images_classic/."""
    root = tmp_path / 'data'
    lists = root / 'benchmark_imglist' / 'cifar10'
    lists.mkdir(parents=True)

    def write(list_name, rows):
        (lists / list_name).write_text(''.join(f'{p} {label}\n' for p, label in rows))
        for i, (p, _) in enumerate(rows):
            _png(root / 'images_classic' / p, value=20 * i % 255)

    write('test_cifar10.txt', [(f'cifar10/test/{c}/{i}.png', k) for k, c in enumerate(CIFAR_CLASSES) for i in range(2)])
    write('train_cifar10.txt', [(f'cifar10/train/{c}/{i}.png', k) for k, c in enumerate(CIFAR_CLASSES)
                                for i in range(6)])
    write('test_cifar100.txt', [(f'cifar100/test/{i}.png', -1) for i in range(6)])
    write('test_svhn.txt', [(f'svhn/test/{i}.png', -1) for i in range(5)])
    (lists / 'test_tin.txt').write_text('tin/test/missing.png -1\n')  # a list whose images were never downloaded
    return root


def test_openood_imglists_give_its_splits_groups_and_skips(openood_root):
    data = load_protocol('cifar10', openood_root=str(openood_root))
    assert data.name == 'openood-cifar10' and data.classes == CIFAR_CLASSES
    assert len(data.test) == 20 and [data.test[i][1] for i in (0, 1, 2, 19)] == [0, 0, 1, 9]
    assert len(data.fit) == 60
    assert {k: len(v) for k, v in data.ood.items()} == {'cifar100': 6, 'svhn': 5}
    assert data.groups == {'near': ['cifar100'], 'far': ['svhn']}
    assert set(data.skipped) >= {'tin', 'mnist', 'texture', 'places365', 'val'}
    assert 'lists images that are not there' in data.skipped['tin']
    image, label = data.ood['svhn'][0]
    assert image.mode == 'RGB' and label == -1


def test_openood_end_to_end_eval(openood_root, tmp_path):
    payload = evaluate.main(['--model', 'ssod_test_resnet.synthetic', '--protocol', 'cifar10', '--openood-root',
                             str(openood_root), '--out', str(tmp_path / 'out'), '--no-plots', '--workers', '0',
                             '--fit-limit', '60', '--device', 'cpu'])
    assert set(payload['ood']) == {'cifar100', 'svhn', 'average'}
    assert payload['config']['groups'] == {'near': ['cifar100'], 'far': ['svhn']}
    assert 'fpr95_openood' in payload['ood']['average']['ssod']
    assert 'Skipped' in (tmp_path / 'out' / 'results.md').read_text()
    # scores.csv names each OOD image's file (the protocol's image lists expose their paths)
    import csv
    with open(tmp_path / 'out' / 'scores.csv', newline='') as f:
        rows = [r for r in csv.DictReader(f) if r['set'] == 'svhn']
    assert len(rows) == 5 and all(r['path'].endswith('.png') and 'svhn' in r['path'] for r in rows)


def test_protocol_sets_name_a_corrupt_image(openood_root):
    from ssod_zoo.app.images import ImageError
    data = load_protocol('cifar10', openood_root=str(openood_root))
    data.ood['svhn'].paths[0].write_bytes(b'not an image')
    with pytest.raises(ImageError, match=r'cannot read image .*svhn.*0\.png'):
        data.ood['svhn'][0]


# ----------------------------------------------------------------------------------- both FPR95 conventions
def test_fpr95_openood_convention_on_toy_scores():
    id_scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1])
    ood_scores = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.65])
    # paper (ID positive): keep 95% of ID -> threshold 0.1 -> every OOD image kept
    assert fpr_at_tpr(id_scores, ood_scores) == 1.0
    # OpenOOD (OOD positive): reject 95% of OOD -> threshold 0.65 -> ID images 0.6 and 0.1 rejected
    assert fpr95_ood_positive(id_scores, ood_scores) == pytest.approx(0.4)


# (OpenOOD's formula itself, on tied scores:
# test_metrics.py::test_openoods_ood_positive_fpr_agrees_with_sklearn_at_any_tpr)


# ------------------------------------------------------------------------------------------------ release
class _FakeHub:
    """Records the calls; each is bound to the real ``huggingface_hub.HfApi`` method's signature first, so a wrong
    or misspelt argument fails here as it would against the Hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, *args, **kw):
        repo_id = bind_hfapi('create_repo', *args, **kw).arguments['repo_id']
        self.calls.append(('create_repo', repo_id))
        return type('Url', (), {'repo_id': repo_id})()

    def upload_folder(self, *args, **kw):
        folder = bind_hfapi('upload_folder', *args, **kw).arguments['folder_path']
        self.calls.append(('upload_folder', sorted(p.name for p in Path(folder).iterdir())))


@needs_fmnist
def test_release_evaluates_calibrates_cards_and_pushes(tmp_path, fmnist, monkeypatch, capsys):
    """A tiny Fashion-MNIST run through the `ssod release` command: float16 file, threshold calibrated on the
    validation split, test numbers in the card's model-index, the folder pushed as written, release.pt for
    add_weight."""
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from ssod_zoo import hub as hub_mod
    from ssod_zoo.app import cli
    from ssod_zoo.app.evaluate import collect
    from ssod_zoo.app.protocols import Transformed
    from ssod_zoo.app.release import release
    run = tmp_path / 'run'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train.main(['--model', 'ssod_test_resnet', '--data', 'fashion-mnist', '--data-root', str(FMNIST_ROOT),
                    '--img-size', '32', '--crop-pct', '1.0', '--batch-size', '32', '--max-steps-per-epoch', '2',
                    '--epochs', '1', '--workers', '0', '--out-dir', str(run), '--no-progress'])
    hub = _FakeHub()
    made = {}
    monkeypatch.setattr(hub_mod, 'HfApi', lambda **kw: made.update(kw) or hub)
    real_release = release
    monkeypatch.setattr('ssod_zoo.app.release.release',
                        lambda *a, **kw: made.setdefault('done', real_release(*a, **kw)))
    out = tmp_path / 'out'
    cli.main(['release', str(run), str(out), '--protocol', 'fashion-mnist', '--data-root', str(FMNIST_ROOT),
              '--dtype', 'float16', '--baseline-run', str(run), '--baseline-out', str(tmp_path / 'ce'), '--limit', '48',
              '--fit-limit', '64', '--workers', '0', '--device', 'cpu', '--repo-id', 'me/ssod-fmnist', '--token', 'T'])
    done = made['done']
    assert made['token'] == 'T'
    assert re.fullmatch(rf'released {re.escape(str(run))} to {re.escape(str(out))} \(spatial_threshold \S+, '
                        r'ood_threshold \S+\) in \d+ s; pushed to me/ssod-fmnist',
                        capsys.readouterr().err.splitlines()[-1])
    assert {t.dtype for t in load_file(str(out / 'model.safetensors')).values() if t.is_floating_point()} == \
        {torch.float16}
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['ood_threshold'] == pytest.approx(done['ood_threshold'])
    # the threshold keeps 95% of the ID *validation* images of the released (float16-rounded) weights
    import timm
    from huggingface_hub import ModelCard
    from ssod_zoo import calibrate_threshold, load_model
    released = load_model(str(out))
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=released))
    data = load_protocol('fashion-mnist', str(FMNIST_ROOT), split='train')

    def threshold_on(split):
        return calibrate_threshold(collect(released, DataLoader(Transformed(split, transform), batch_size=64),
                                           torch.device('cpu'))['ood_factor'])
    assert done['ood_threshold'] == pytest.approx(threshold_on(data.val), abs=1e-6)
    assert done['ood_threshold'] != pytest.approx(threshold_on(data.test), abs=1e-6)  # so the split shows
    # and the spatial threshold, of the released model and of the baseline written beside it
    baseline = load_model(str(tmp_path / 'ce')).spatial_threshold
    for folder, value in ((out, done['spatial_threshold']), (tmp_path / 'ce', baseline)):
        model = load_model(str(folder))
        scores = collect(model, DataLoader(Transformed(data.val, transform), batch_size=64), torch.device('cpu'),
                         spatial=True)['spatial_top3']
        assert value is not None and value == pytest.approx(calibrate_threshold(scores), abs=1e-5), folder
    # the card's model-index carries the test numbers of eval/results.json
    results = json.loads((out / 'eval' / 'results.json').read_text())
    assert results['id_accuracy']['ssod'] == pytest.approx(done['metrics']['id_accuracy'])
    eval_results = ModelCard.load(out / 'README.md').data.eval_results
    carded = {(r.dataset_name, r.metric_type): r.metric_value for r in eval_results}
    assert {r.dataset_split for r in eval_results if r.dataset_split} == {'test'}
    assert any(name.startswith('fmnist_heldout') for name, _ in carded)
    for (name, metric), value in carded.items():
        if metric == 'accuracy':
            assert value == pytest.approx(results['id_accuracy']['ssod'], abs=1e-3)
        else:
            assert value == pytest.approx(results['ood'][name.split(' (OOD)')[0]]['ssod'][metric], abs=1e-3)
    # which epoch, and that the validation split chose it (best.pt), not the test images of the table
    card = ' '.join((out / 'README.md').read_text().split())
    assert ("These weights are epoch 1 of 1. That epoch is the run's `best.pt`, chosen on its validation images "
            '(OOD: fmnist_heldout, noise), not on the test images below.') in card
    assert (run / 'release.pt').is_file()
    assert hub.calls[0] == ('create_repo', 'me/ssod-fmnist')
    assert hub.calls[1][1] == ['README.md', 'config.json', 'eval', 'model.safetensors']
    # the folder alone reproduces the numbers (what a user of the pushed repo would run)
    again = evaluate.main(['--model', str(out), '--baseline-model', str(tmp_path / 'ce'), '--protocol', 'fashion-mnist',
                           '--data-root', str(FMNIST_ROOT), '--limit', '48', '--fit-limit', '64', '--workers', '0',
                           '--out', str(tmp_path / 'again'), '--no-plots', '--device', 'cpu'])
    assert again['ood'] == results['ood'] and again['id_accuracy'] == results['id_accuracy']
