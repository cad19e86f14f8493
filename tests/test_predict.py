"""`ssod predict`: class or unknown per image, from any model spec, with the model's own preprocessing."""
import csv
import json
import shutil
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
    return make_checkpoint(tmp_path_factory.mktemp('ckpt') / 'best.pt', threshold=0.5, spatial_threshold=0.0)


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
    # a file named on its own is read whatever its suffix; a folder scan skips the same file
    Image.new('P', (8, 8)).save(tmp_path / 'a' / 'pal.gif')
    assert find_images([str(tmp_path / 'a' / 'pal.gif')]) == [tmp_path / 'a' / 'pal.gif']
    assert len(find_images([str(tmp_path / 'a')])) == 5


def _spatial_by_hand(ckpt):
    """Each DECISIVE image's spatial score, worked out without the adapter: for test_resnet the per-position
    pre-logits are the feature map itself, so the classifier at each position is an einsum with its weights."""
    model = ssod_zoo.load_model(ckpt)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    folder = Path(ckpt).parent / 'images'
    x = torch.stack([transform(Image.open(folder / name).convert('RGB')) for name in DECISIVE])
    fc = model.get_classifier()
    with torch.no_grad():
        cls_map = torch.einsum('bchw,mc->bmhw', model.forward_features(x), fc.weight) + fc.bias[:, None, None]
    best = cls_map.amax(dim=1).flatten(1).topk(3, dim=1).values.mean(dim=1)
    return dict(zip(DECISIVE, best.tolist()))


def _by_hand(rule, spatial, threshold=0.2, spatial_threshold=None):
    """Each DECISIVE image's expected row, worked out from the logits the checkpoint was fitted to."""
    rows = {}
    for name, (logits, diff) in DECISIVE.items():
        z = np.array(logits)
        p = np.exp(z) / np.exp(z).sum()
        f = 1 / (1 + np.exp(-diff))
        unknown = {'factor': f < threshold, 'posterior': 1 - f > f * p.max(),  # Eq. 7: unknown is the argmax
                   'spatial': spatial[name] < spatial_threshold}
        rows[name] = dict(cls=NAMES[int(p.argmax())], prob=p.max(), f=f, s=spatial[name], unknown=unknown[rule],
                          all=unknown)
    return rows


@pytest.fixture(scope='module')
def decisive(tmp_path_factory):
    """The decisive checkpoint, with a spatial threshold halfway between its images' 3rd and 4th largest spatial
    scores, so the spatial rule keeps 3 of the 5 whatever the batch's float rounding."""
    folder = tmp_path_factory.mktemp('decisive')
    ckpt = make_decisive_checkpoint(folder / 'c.pt', folder / 'images', threshold=0.2)
    spatial = _spatial_by_hand(ckpt)
    state = torch.load(ckpt, weights_only=False)
    ranked = sorted(spatial.values())
    state['spatial_threshold'] = (ranked[-3] + ranked[-4]) / 2
    torch.save(state, ckpt)
    return ckpt, spatial, state['spatial_threshold']


@pytest.mark.parametrize('rule', ['spatial', 'factor', 'posterior'])
def test_cli_rows_follow_each_rule(rule, decisive, tmp_path, capsys):
    ckpt, spatial, cut = decisive
    images = tmp_path / 'images'
    shutil.copytree(Path(ckpt).parent / 'images', images)
    (images / 'broken.jpg').write_bytes(b'not a jpeg')
    out = tmp_path / 'pred.csv'
    argv = ['predict', str(ckpt), str(images), '--out', str(out), '--batch-size', '2']
    cli.main(argv + (['--rule', rule] if rule != 'spatial' else []))  # spatial is the default
    rows = {Path(r['path']).name: r for r in read_csv(out)}
    assert list(next(iter(rows.values()))) == list(COLUMNS) and set(rows) == set(DECISIVE)
    expected = _by_hand(rule, spatial, spatial_threshold=cut)
    for name, r in rows.items():
        e = expected[name]
        assert r['class'] == e['cls'] and float(r['class_prob']) == pytest.approx(e['prob'], abs=1e-3)
        assert float(r['ood_factor']) == pytest.approx(e['f'], abs=1e-3)
        assert float(r['spatial_score']) == pytest.approx(e['s'], abs=1e-4)
        assert float(r['p_unknown']) == pytest.approx(1 - e['f'], abs=1e-3)  # Eq. 7's unknown column
        assert r['label'] == ('unknown' if e['unknown'] else e['cls'])
        # the file says how its labels were decided: the rule, and the threshold it used (none for posterior)
        assert r['rule'] == rule
        assert r['threshold'] == ('' if rule == 'posterior' else '0.2' if rule == 'factor' else str(round(cut, 6)))
    # the factor and posterior rules differ on odd_a alone (ood_factor 0.40: above the threshold 0.2, below
    # 1 / (1 + 0.58))
    if rule != 'spatial':
        assert rows['odd_a.png']['label'] == ('cat' if rule == 'factor' else 'unknown')
    assert sum(r['label'] == 'unknown' for r in rows.values()) == (2 if rule == 'spatial' else
                                                                   1 if rule == 'factor' else 2)
    err = capsys.readouterr().err
    assert 'broken.jpg' in err and 'skipped' in err  # one line naming the file, not a traceback
    counts = {r: sum(e['all'][r] for e in expected.values()) for r in ('spatial', 'factor', 'posterior')}
    others = ', '.join(f'{r} {n}' for r, n in counts.items() if r != rule)
    assert f'5 images, {counts[rule]} unknown' in err and f'the other rules would say unknown for: {others}' in err
    assert b'\r' not in out.read_bytes()  # Unix line ends: cut and awk see no stray carriage return
    # nothing readable: an error, so that a script sees that nothing was predicted
    with pytest.raises(SystemExit) as e:
        cli.main(['predict', str(ckpt), str(images / 'broken.jpg'), '--out', str(tmp_path / 'none.csv')])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        'ssod predict: error: the one image given is unreadable (named above), so nothing was predicted')


def test_rules_a_model_cannot_run_are_left_out_of_the_summary(decisive, tmp_path, capsys):
    """A cross-entropy twin has a spatial threshold and no ood_threshold: the summary counts only what can run."""
    ckpt, _, _ = decisive
    state = torch.load(ckpt, weights_only=False)
    state['ood_threshold'] = None
    torch.save(state, tmp_path / 'ce.pt')
    cli.main(['predict', str(tmp_path / 'ce.pt'), str(Path(ckpt).parent / 'images'), '--out', str(tmp_path / 'p.csv')])
    err = capsys.readouterr().err
    assert 'the other rules would say unknown for: posterior' in err and 'factor' not in err
    with pytest.raises(SystemExit):
        cli.main(['predict', str(tmp_path / 'ce.pt'), str(Path(ckpt).parent / 'images'), '--rule', 'factor'])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no calibrated ood_threshold' in err[0] and '--rule spatial or --rule posterior' in err[0]


def test_threshold_ranges_depend_on_the_rule(calibrated, tmp_path, capsys):
    images = str(make_images(tmp_path / 'i', n=1))
    for argv, says in ((['--rule', 'factor', '--threshold', '2'], 'in [0, 1] for --rule factor'),
                       (['--rule', 'posterior', '--threshold', '0.5'], 'takes no threshold'),
                       (['--threshold', 'nan'], 'a finite number')):
        with pytest.raises(SystemExit) as e:
            cli.main(['predict', str(calibrated), images, *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err
    cli.main(['predict', str(calibrated), images, '--threshold', '25', '--out', str(tmp_path / 'p.csv')])  # logits
    assert [r['label'] for r in read_csv(tmp_path / 'p.csv')] == ['unknown']


def test_preprocessing_comes_from_the_model(tmp_path):
    model = ssod_zoo.load_model(make_checkpoint(tmp_path / 'c.pt', threshold=0.5, size=48, spatial_threshold=0.0))
    seen = []
    forward = model.forward_scores
    model.forward_scores = lambda x: (seen.append(tuple(x.shape[-2:])), forward(x))[1]
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
    assert len(err) == 1 and '--threshold' in err[0] and 'ssod calibrate' in err[0] and 'spatial_threshold' in err[0]
    assert '--rule posterior' in err[0] and '--rule factor' not in err[0]  # no ood_threshold either
    assert captured.out == ''  # no CSV header on stdout before the error
    # each remedy works
    out = tmp_path / 'p.jsonl'
    cli.main(['predict', str(ckpt), str(images), '--threshold', '0.3', '--out', str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r['label'] == ('unknown' if r['spatial_score'] < 0.3 else r['class']) for r in rows)
    assert {(r['rule'], r['threshold']) for r in rows} == {('spatial', 0.3)}  # the --threshold given, not a default
    cli.main(['predict', str(ckpt), str(images), '--rule', 'factor', '--threshold', '0.3', '--out', str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r['label'] == ('unknown' if r['ood_factor'] < 0.3 else r['class']) for r in rows)
    cli.main(['predict', str(ckpt), str(images), '--rule', 'posterior', '--out', str(out)])
    assert len(out.read_text().splitlines()) == 5
    for suffix in ('.json', '.ndjson'):  # JSON lines under either name too
        cli.main(['predict', str(ckpt), str(images), '--rule', 'factor', '--threshold', '0.3',
                  '--out', str(out.with_suffix(suffix))])
        assert [json.loads(line) for line in out.with_suffix(suffix).read_text().splitlines()] == rows


def test_missing_input_is_one_line(calibrated, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(['predict', str(calibrated), str(tmp_path / 'nothing_here')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'nothing_here: no such file or folder' in err


def test_shipped_tag_and_hub_folder_load(tmp_path):
    images = make_images(tmp_path / 'i', n=2)
    folder = ssod_zoo.save_pretrained(ssod_zoo.load_model(make_checkpoint(tmp_path / 'c.pt', threshold=0.4,
                                                                          spatial_threshold=0.0)),
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
    # the spatial readout: its own threshold, in logits (no [0, 1] range), and its own message
    s = torch.tensor([3.0, 12.0])
    with pytest.raises(ValueError, match='no calibrated spatial_threshold.*ssod calibrate'):
        model.accepts(s, readout='spatial')
    model.spatial_threshold = 5.0
    assert model.accepts(s, readout='spatial').tolist() == [False, True]
    assert model.accepts(s, threshold=2.0, readout='spatial').tolist() == [True, True]
    # a threshold is one of the ID scores it was calibrated on (calibrate_threshold), and that score is kept
    ids = torch.linspace(1.0, 20.0, 40)
    kept = model.accepts(ids, threshold=ssod_zoo.calibrate_threshold(ids), readout='spatial')
    assert kept.sum().item() == 38 and kept.tolist() == [False] * 2 + [True] * 38
    assert model.accepts(torch.tensor([0.5, 0.5]), threshold=0.5).tolist() == [True, True]
    with pytest.raises(ValueError, match='must be in \\[0, 1\\]'):
        model.accepts(f, threshold=5.0)  # an ood_factor threshold
    with pytest.raises(ValueError, match="a bare tensor as ood_factor.*readout='spatial'"):
        model.accepts(s)  # spatial scores, read as ood_factor: refused, not compared with ood_threshold
    with pytest.raises(ValueError, match="a tensor with readout='factor' as ood_factor.*readout='spatial'"):
        model.accepts(s, readout='factor')  # the same when the readout is named (it used to keep them all)
    with pytest.raises(TypeError, match='forward_scores'):
        model.accepts(model.eval()(torch.zeros(1, 3, 32, 32)))  # an SSODOutput
    with pytest.raises(ValueError, match="readout is one of 'spatial', 'factor'"):
        model.accepts(s, readout='maxlogit')
    # all the scores of forward_scores: decided by the model's readout, the spatial one when none was chosen
    scores = ssod_zoo.SSODScores(torch.zeros(2, 3), f, s)
    assert model.readout is None and model.accepts(scores).tolist() == [False, True]
    assert model.accepts(scores, readout='factor').tolist() == [True, True]
    model.readout = 'factor'
    assert model.accepts(scores).tolist() == [True, True]
    assert model.accepts(scores, threshold=0.5).tolist() == [False, True]  # a threshold for the readout's score


def test_spatial_score_and_forward_scores_agree_with_the_readout_they_name():
    torch.manual_seed(0)
    model = timm.create_model('ssod_test_resnet', num_classes=4).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        cls_map, _ = model.forward_positions(model.forward_features(x))
        scores = model.forward_scores(x)
        logits, ood_factor = model.forward_ssod(x)
        # by hand: test_resnet's per-position pre-logits are the feature map itself
        fc = model.get_classifier()
        by_hand = (torch.einsum('bchw,mc->bmhw', model.forward_features(x), fc.weight) + fc.bias[:, None, None])
        by_hand = by_hand.amax(dim=1).flatten(1).topk(3, dim=1).values.mean(dim=1)
        torch.testing.assert_close(model.spatial_score(x), by_hand, atol=1e-5, rtol=0)
        assert torch.equal(model.spatial_score(x), ssod_zoo.spatial_maxlogit_score(cls_map, k=3))
    assert torch.equal(scores.spatial_score, model.spatial_score(x).detach())
    # the classifier the threshold was set on goes with it
    model.spatial_threshold = 1.0
    model.reset_classifier(5)
    assert model.spatial_threshold is None
    assert torch.equal(scores.logits, logits) and torch.equal(scores.ood_factor, ood_factor)


def test_a_glob_that_matches_folders_searches_them(tmp_path):
    make_images(tmp_path / 'a')          # 5 images, 2 of them in a/sub
    make_images(tmp_path / 'b', n=2)
    found = find_images([str(tmp_path / '*')])  # matches the folders a and b only
    assert len(found) == 7 and len(set(found)) == 7
    assert len(find_images([str(tmp_path / 'a' / '*')])) == 5  # 3 files and the folder sub (2 more)


def test_a_cross_entropy_model_decides_with_the_spatial_score_alone(calibrated, tmp_path, capsys):
    """A twin's OOD head was never trained: its folder says so, the loaded model knows it, and nothing is decided
    or written from its ood_factor."""
    images = make_images(tmp_path / 'imgs')
    twin = ssod_zoo.save_pretrained(ssod_zoo.load_model(calibrated), tmp_path / 'ce', class_names=NAMES,
                                    train_config={'ce_only': True})
    model = ssod_zoo.load_model(twin)
    assert model.ood_head_trained is False and model.ood_threshold is None
    assert ssod_zoo.load_model(calibrated).ood_head_trained is True
    cli.main(['predict', str(twin), str(images), '--out', str(tmp_path / 'p.csv')])
    rows = read_csv(tmp_path / 'p.csv')
    assert len(rows) == 5 and all(r['ood_factor'] == r['p_unknown'] == '' and r['spatial_score'] for r in rows)
    err = capsys.readouterr().err
    assert 'unknown (spatial_score <' in err and 'other rules' not in err  # no posterior count either
    for rule in ('factor', 'posterior'):
        with pytest.raises(SystemExit):
            cli.main(['predict', str(twin), str(images), '--rule', rule])
        assert 'OOD head was never trained' in capsys.readouterr().err
    with torch.no_grad():
        scores = model.forward_scores(torch.zeros(2, 3, 64, 64))
        assert torch.isnan(scores.ood_factor).all()  # no OOD factor to read
        with pytest.warns(ssod_zoo.UntrainedOODHeadWarning, match='never trained') as caught:
            assert 0 <= float(model(torch.zeros(2, 3, 64, 64)).ood_factor.min())  # forward keeps its contract
        with pytest.warns(ssod_zoo.UntrainedOODHeadWarning) as caught_ssod:
            model.forward_ssod(torch.zeros(1, 3, 64, 64))
        assert caught[0].filename == caught_ssod[0].filename == __file__  # each points at the caller's line
    assert model.accepts(scores).shape == (2,)  # the spatial readout
    for factor in (scores.ood_factor, torch.tensor([0.25, 0.75])):
        with pytest.raises(ValueError, match='never trained'):
            model.accepts(factor, threshold=0.5)
    from ssod_zoo.export import _metadata
    assert _metadata(model, (3, 64, 64))['ssod_zoo.ood_head_trained'] == 'false'
    # the flag survives a re-save without the training config, and timm's own loader reads it
    again = ssod_zoo.save_pretrained(model, tmp_path / 'again')
    assert json.loads((again / 'config.json').read_text())['ood_head_trained'] is False
    assert timm.create_model(f'local-dir:{again}', pretrained=True).ood_head_trained is False


def test_a_reader_that_stops_early_ends_the_output_quietly(tmp_path):
    """`ssod predict ... | head`: once the reader has closed the pipe the rest is dropped, with no traceback."""
    import subprocess
    import sys
    rng = np.random.default_rng(0)
    for i in range(300):  # more rows than a pipe's buffer holds
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f'{i:03d}.png')
    cmd = [sys.executable, '-m', 'ssod_zoo.app.cli', 'predict', 'ssod_test_resnet.synthetic', str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b'path,label,class')
    proc.stdout.close()  # as head does after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and 'Traceback' not in err and 'BrokenPipe' not in err, err


def test_a_16_bit_grey_image_reads_as_its_8_bit_twin(calibrated, tmp_path):
    """PIL opens a 16-bit PNG as 'I;16' and its convert('RGB') clips every value above 255 to white; predict and
    the folder datasets scale it onto 0-255 instead, so it scores as the same picture saved in 8 bits."""
    from ssod_zoo.app.images import read_image
    grey = np.random.default_rng(0).integers(0, 256, (24, 24)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / 'a8.png')
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'a16.png')
    assert Image.open(tmp_path / 'a16.png').mode == 'I;16'
    assert (np.asarray(read_image(tmp_path / 'a16.png')) == np.asarray(read_image(tmp_path / 'a8.png'))).all()
    model = ssod_zoo.load_model(calibrated)
    rows = {Path(r['path']).name: r for r in predict(model, find_images([str(tmp_path)]), device=torch.device('cpu'))}
    assert rows['a16.png']['spatial_score'] == rows['a8.png']['spatial_score']
