"""`ssod predict`: class or unknown per image, from any model spec, with the model's own preprocessing."""
import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import ssod_zoo
from ssod_zoo.app import cli
from ssod_zoo.app.predict import COLUMNS, find_images, predict

from cli_helpers import NAMES, make_checkpoint


def make_images(folder, n=5, corrupt=False):
    rng = np.random.default_rng(0)
    (folder / 'sub').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        where = folder / 'sub' if i % 2 else folder
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(where / f'{i}.png')
    (folder / 'notes.txt').write_text('not an image, and not listed')
    if corrupt:
        (folder / 'broken.jpg').write_bytes(b'not a jpeg')
    return folder


@pytest.fixture(scope='module')
def calibrated(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp('ckpt') / 'best.pt', threshold=0.5)


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_find_images_takes_files_folders_recursively_and_globs(tmp_path):
    make_images(tmp_path / 'a')
    assert len(find_images([str(tmp_path / 'a')])) == 5  # sub-folder included, .txt left out
    assert len(find_images([str(tmp_path / 'a' / '*.png')])) == 3
    assert len(find_images([str(tmp_path / 'a' / '**' / '*.png')])) == 5
    both = find_images([str(tmp_path / 'a' / '0.png'), str(tmp_path / 'a')])
    assert len(both) == 5 and both[0].name == '0.png'  # no duplicates, given files first


def test_cli_rows_follow_the_threshold_rule_and_robust_posterior(calibrated, tmp_path, capsys):
    images = make_images(tmp_path / 'images', corrupt=True)
    out = tmp_path / 'pred.csv'
    cli.main(['predict', str(calibrated), str(images), '--out', str(out), '--batch-size', '2'])
    rows = read_csv(out)
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 5
    for r in rows:
        f, p_unknown = float(r['ood_factor']), float(r['p_unknown'])
        assert p_unknown == pytest.approx(1 - f, abs=1e-5)  # Eq. 7's unknown column
        assert r['class'] in NAMES  # label names come from the checkpoint's class_names
        assert r['label'] == ('unknown' if f < 0.5 else r['class'])
    err = capsys.readouterr().err
    assert 'broken.jpg' in err and 'skipped' in err  # one line naming the file, not a traceback
    assert '5 images' in err and 'would decide' in err


def test_posterior_rule_is_the_argmax_of_eq7(calibrated, tmp_path):
    images = make_images(tmp_path / 'images')
    model = ssod_zoo.load_model(calibrated)
    paths = find_images([str(images)])
    rows = list(predict(model, paths, rule='posterior', progress=False))
    x = torch.stack([timm.data.create_transform(**timm.data.resolve_data_config(model=model))(
        Image.open(p).convert('RGB')) for p in paths])
    with torch.no_grad():
        out = model.forward_ssod(x)
    posterior = ssod_zoo.robust_posterior(out.logits, out.ood_factor)
    unknown = posterior.argmax(1) == posterior.shape[1] - 1
    assert [r['label'] == 'unknown' for r in rows] == unknown.tolist()
    by_factor = (out.ood_factor < model.ood_threshold).tolist()
    assert [r['_disagree'] for r in rows] == [a != b for a, b in zip(by_factor, unknown.tolist())]


def test_preprocessing_comes_from_the_model(tmp_path):
    model = ssod_zoo.load_model(make_checkpoint(tmp_path / 'c.pt', threshold=0.5, size=48))
    seen = []
    forward = model.forward_ssod
    model.forward_ssod = lambda x: (seen.append(tuple(x.shape[-2:])), forward(x))[1]
    list(predict(model, find_images([str(make_images(tmp_path / 'i'))]), progress=False))
    assert seen and set(seen) == {(48, 48)}


def test_uncalibrated_model_without_threshold_is_one_line(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / 'c.pt', threshold=None)
    images = make_images(tmp_path / 'i')
    with pytest.raises(SystemExit) as e:
        cli.main(['predict', str(ckpt), str(images)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--threshold' in err[0] and 'calibrat' in err[0]
    # either remedy works
    out = tmp_path / 'p.jsonl'
    cli.main(['predict', str(ckpt), str(images), '--threshold', '0.3', '--out', str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r['label'] == ('unknown' if r['ood_factor'] < 0.3 else r['class']) for r in rows)
    cli.main(['predict', str(ckpt), str(images), '--rule', 'posterior', '--out', str(out)])
    assert len(out.read_text().splitlines()) == 5


def test_missing_input_is_one_line(calibrated, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(['predict', str(calibrated), str(tmp_path / 'nothing_here')])
    assert capsys.readouterr().err.count('\n') == 1


def test_shipped_tag_and_hub_folder_load(tmp_path):
    images = make_images(tmp_path / 'i', n=2)
    folder = ssod_zoo.save_pretrained(ssod_zoo.load_model(make_checkpoint(tmp_path / 'c.pt', threshold=0.4)),
                                      tmp_path / 'hub', class_names=NAMES, model_card=False)
    for spec in (str(folder), f'local-dir:{folder}'):
        cli.main(['predict', spec, str(images), '--out', str(tmp_path / 'p.csv')])
        assert {r['class'] for r in read_csv(tmp_path / 'p.csv')} <= set(NAMES)
    cli.main(['predict', 'ssod_test_resnet.synthetic', str(images), '--out', str(tmp_path / 's.csv')])
    assert len(read_csv(tmp_path / 's.csv')) == 2


def test_accepts_says_what_to_do_when_uncalibrated():
    model = timm.create_model('ssod_test_resnet', num_classes=3)
    f = torch.tensor([0.2, 0.8])
    with pytest.raises(ValueError, match='calibrate'):
        model.accepts(f)
    assert model.accepts(f, threshold=0.5).tolist() == [False, True]
    model.ood_threshold = 0.1
    assert model.accepts(f).tolist() == [True, True]
