"""`ssod predict`: class or unknown per image, from any model spec, with the model's own preprocessing."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import ssod_zoo
from ssod_zoo.app import cli
from ssod_zoo.app.predict import COLUMNS, find_images, predict

from cli_helpers import DECISIVE, NAMES, make_checkpoint, make_decisive_checkpoint


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


def _by_hand(rule, threshold=0.2):
    """Each DECISIVE image's expected row, worked out from the logits the checkpoint was fitted to."""
    rows = {}
    for name, (logits, diff) in DECISIVE.items():
        z = np.array(logits)
        p = np.exp(z) / np.exp(z).sum()
        f = 1 / (1 + np.exp(-diff))
        unknown = f < threshold if rule == 'factor' else 1 - f > f * p.max()  # Eq. 7: unknown is the argmax
        rows[name] = dict(cls=NAMES[int(p.argmax())], prob=p.max(), f=f, unknown=unknown)
    return rows


@pytest.mark.parametrize('rule', ['factor', 'posterior'])
def test_cli_rows_follow_each_rule(rule, tmp_path, capsys):
    ckpt = make_decisive_checkpoint(tmp_path / 'c.pt', tmp_path / 'images', threshold=0.2)
    (tmp_path / 'images' / 'broken.jpg').write_bytes(b'not a jpeg')
    out = tmp_path / 'pred.csv'
    cli.main(['predict', str(ckpt), str(tmp_path / 'images'), '--rule', rule, '--out', str(out), '--batch-size', '2'])
    rows = {Path(r['path']).name: r for r in read_csv(out)}
    assert list(next(iter(rows.values()))) == list(COLUMNS) and set(rows) == set(DECISIVE)
    expected = _by_hand(rule)
    for name, r in rows.items():
        e = expected[name]
        assert r['class'] == e['cls'] and float(r['class_prob']) == pytest.approx(e['prob'], abs=1e-3)
        assert float(r['ood_factor']) == pytest.approx(e['f'], abs=1e-3)
        assert float(r['p_unknown']) == pytest.approx(1 - e['f'], abs=1e-3)  # Eq. 7's unknown column
        assert r['label'] == ('unknown' if e['unknown'] else e['cls'])
    # the two rules differ on odd_a alone (ood_factor 0.40: above the threshold 0.2, below 1 / (1 + 0.58))
    assert rows['odd_a.png']['label'] == ('cat' if rule == 'factor' else 'unknown')
    err = capsys.readouterr().err
    assert 'broken.jpg' in err and 'skipped' in err  # one line naming the file, not a traceback
    n_unknown = sum(e['unknown'] for e in expected.values())
    assert f'5 images, {n_unknown} unknown' in err and 'would decide 1 differently' in err


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
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and '--threshold' in err[0] and 'calibrat' in err[0]
    assert captured.out == ''  # no CSV header on stdout before the error
    # either remedy works
    out = tmp_path / 'p.jsonl'
    cli.main(['predict', str(ckpt), str(images), '--threshold', '0.3', '--out', str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r['label'] == ('unknown' if r['ood_factor'] < 0.3 else r['class']) for r in rows)
    cli.main(['predict', str(ckpt), str(images), '--rule', 'posterior', '--out', str(out)])
    assert len(out.read_text().splitlines()) == 5
    for suffix in ('.json', '.ndjson'):  # JSON lines under either name too
        cli.main(['predict', str(ckpt), str(images), '--threshold', '0.3', '--out', str(out.with_suffix(suffix))])
        assert [json.loads(line) for line in out.with_suffix(suffix).read_text().splitlines()] == rows


def test_missing_input_is_one_line(calibrated, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(['predict', str(calibrated), str(tmp_path / 'nothing_here')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'nothing_here: no such file or folder' in err


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
