"""`ssod eval` reports what a user decides with (issue 13, item 2): counts, accept rates at the model's threshold,
bootstrap intervals, per-image scores, every method's histogram, detectors sized to small fit sets, flat OOD
folders, and one line for a corrupt image."""
import csv
import json
from pathlib import Path

import matplotlib.axes
import pytest
import torch

import ssod_zoo
from ssod_zoo import metrics
from ssod_zoo.app import evaluate, plots
from ssod_zoo.app.report import bootstrap_ci, bootstrap_metrics, fit_detectors

from cli_helpers import class_tree, make_checkpoint, save_images


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    return {'ckpt': make_checkpoint(root / 'best.pt', threshold=0.5),
            'val': class_tree(root / 'val', 4), 'fit': class_tree(root / 'fit', 3, seed=10),
            'flat': save_images(root / 'flat_ood', 5, seed=20),  # images directly in the folder
            'nested': save_images(root / 'nested_ood' / 'a' / 'b', 3, seed=30).parent.parent}


def test_eval_reports_counts_accept_rates_intervals_and_per_image_scores(data, tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(matplotlib.axes.Axes, 'axvline', lambda self, x, **kw: lines.append((self.get_title(), x)))
    with pytest.warns(UserWarning, match='KNN: k=50'):
        payload = evaluate.main(['--model', str(data['ckpt']), '--val-dir', str(data['val']), '--ood-dirs',
                                 str(data['flat']), str(data['nested']), '--fit-dir', str(data['fit']),
                                 '--out', str(tmp_path), '--workers', '0', '--batch-size', '8',
                                 '--bootstrap', '200'])
    rates = payload['accept_rates']['ssod']
    assert {k: v['n'] for k, v in rates.items()} == {'id': 12, 'flat_ood': 5, 'nested_ood': 3}
    # the checkpoint has no spatial_threshold: counts for that readout, no rates, and results.md says how to get one
    assert payload['thresholds'] == {'ssod_spatial_top3': None, 'ssod': 0.5}
    assert all(v['accepted'] is None for v in payload['accept_rates']['ssod_spatial_top3'].values())
    with open(tmp_path / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and all(r['path'].endswith('.png') for r in rows)
    assert {'ssod', 'msp', 'knn', 'vim', 'mahalanobis'} <= set(rows[0])
    for name, r in rates.items():  # accept rate = share of ood_factor >= the model's threshold
        kept = [float(x['ssod']) >= 0.5 for x in rows if x['set'] == name]
        assert r['accepted'] == pytest.approx(100 * sum(kept) / len(kept))
    assert set(payload['ci']) == {'flat_ood', 'nested_ood'}
    for by_method in payload['ci'].values():
        for c in by_method.values():
            assert 0 <= c['fpr95'][0] <= c['fpr95'][1] <= 100 and 0 <= c['auroc'][0] <= c['auroc'][1] <= 100
    md = (tmp_path / 'results.md').read_text()
    assert 'Accepted %, `ood_factor`' in md and '95% CI' in md
    assert 'no calibrated `spatial_threshold` (`ssod calibrate` sets it' in md
    # every method gets a histogram row, and the SSOD rows carry the model's threshold
    titles = {t.split(':')[0] for t, _ in lines}
    assert titles == {'ssod'} and {x for _, x in lines} == {0.5}
    assert (tmp_path / 'histograms.png').is_file()
    assert json.loads((tmp_path / 'results.json').read_text())['accept_rates']['ssod'] == rates


def test_unreadable_images_are_named_all_at_once(data, tmp_path, capsys, monkeypatch):
    """Every unreadable image of the run in one line, before any scoring when a header shows it; a file cut short
    (whose header reads: a JPEG passes PIL's verify() too) stops the scoring, and then every file is decoded, so all
    of them are named too."""
    import io

    from PIL import Image

    from ssod_zoo.app.images import list_images
    ood, other = save_images(tmp_path / 'ood', 2), save_images(tmp_path / 'other', 2)
    (ood / 'broken.png').write_bytes(b'\x89PNG not really')
    for name, kind in (('cut.png', 'PNG'), ('cut.jpg', 'JPEG')):
        encoded = io.BytesIO()
        Image.effect_noise((64, 64), 60).convert('RGB').save(encoded, kind)
        (other / name).write_bytes(encoded.getvalue()[:len(encoded.getvalue()) // 2])
    real_evaluate = evaluate.evaluate
    monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **k: pytest.fail('scored despite a broken header'))

    def run():
        with pytest.raises(SystemExit) as e:
            evaluate.main(['--model', str(data['ckpt']), '--val-dir', str(data['val']), '--ood-dirs', str(ood),
                           str(other), '--out', str(tmp_path / 'out'), '--workers', '1', '--no-plots',
                           '--bootstrap', '0'])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and 'Traceback' not in err[0], err
        assert err[0].endswith('Fix or delete them and run again (ssod eval scores every image it finds; ssod '
                               'predict skips unreadable ones)'), err
        return err[0]

    total = sum(len(list_images(d)) for d in (data['val'], ood, other))
    line = run()  # the header check stops it, before any scoring; decoding finds the cut files too
    assert f'3 of {total} images cannot be read: cannot read image {ood / "broken.png"} (' in line
    assert f'; also {other / "cut.jpg"}, {other / "cut.png"}. Fix' in line
    (ood / 'broken.png').unlink()
    monkeypatch.setattr(evaluate, 'evaluate', real_evaluate)
    line = run()  # only the cut files: the header check passes, the scoring stops, decoding names both
    assert f'2 of {total - 1} images cannot be read: cannot read image {other / "cut.jpg"} (' in line
    assert f'; also {other / "cut.png"}. Fix' in line
    assert not (tmp_path / 'out' / 'results.json').exists()
    # a missing folder is not an unreadable file: no such hint there
    (other / 'cut.png').unlink()
    (other / 'cut.jpg').unlink()
    with pytest.raises(SystemExit):
        evaluate.main(['--model', str(data['ckpt']), '--val-dir', str(data['val']), '--ood-dirs', str(ood),
                       '--fit-dir', str(ood), '--out', str(tmp_path / 'out'), '--no-plots'])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'Fix or delete' not in err[0], err


def test_a_baseline_with_other_classes_is_refused(data, tmp_path, capsys):
    other = make_checkpoint(tmp_path / 'ce.pt', num_classes=2)
    with pytest.raises(SystemExit) as e:
        evaluate.main(['--model', str(data['ckpt']), '--baseline-model', str(other), '--val-dir', str(data['val']),
                       '--ood-dirs', str(data['flat']), '--out', str(tmp_path / 'out'), '--no-plots'])
    assert e.value.code == 2
    assert f'--baseline-model {other} has 2 classes, {data["val"]} has 3' in capsys.readouterr().err


def test_a_baseline_with_another_normalisation_is_refused(data, tmp_path, capsys):
    """Both models score the same images, preprocessed for --model: a baseline normalised otherwise would read
    them wrongly (and ODIN's step, in pixel units, divides by the std)."""
    other = make_checkpoint(tmp_path / 'ce.pt')
    ckpt = torch.load(other, weights_only=True)
    ckpt['data_config'].update(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    torch.save(ckpt, other)
    with pytest.raises(SystemExit) as e:
        evaluate.main(['--model', str(data['ckpt']), '--baseline-model', str(other), '--val-dir', str(data['val']),
                       '--ood-dirs', str(data['flat']), '--out', str(tmp_path / 'out'), '--no-plots'])
    assert e.value.code == 2
    assert (f'--baseline-model {other} normalises its images with mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, '
            f'0.225), --model {data["ckpt"]} with (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5)') in capsys.readouterr().err


def test_without_a_baseline_no_row_claims_a_ce_model(data, tmp_path):
    payload = evaluate.main(['--model', str(data['ckpt']), '--val-dir', str(data['val']), '--ood-dirs',
                             str(data['flat']), '--out', str(tmp_path), '--workers', '0', '--no-plots',
                             '--bootstrap', '0', '--fit-dir', str(data['fit']), '--knn-k', '2'])
    md = (tmp_path / 'results.md').read_text()
    assert 'CE model' not in md
    # the main table and the one with both FPR95 conventions name each method alike
    assert md.count('| mean MaxLogit of the 3 best positions (same model) |') == 2
    assert md.count('| SSOD OOD factor, Eq. 15 (paper) |') == 2
    assert set(payload['id_accuracy']) == {'ssod'}


def test_knn_k_is_capped_below_the_smallest_class_and_small_fits_are_flagged():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(12, 40, generator=g), torch.arange(3).repeat_interleave(4)
    classifier = torch.nn.Linear(40, 3)
    with pytest.warns(UserWarning) as caught:
        detectors = fit_detectors(f, y, classifier, knn_k=50)
    text = ' '.join(str(c.message) for c in caught)
    assert detectors['knn'].k == 3 and 'KNN: k=50' in text
    assert 'Mahalanobis' in text and 'ViM' in text  # 12 images for 40 dimensions (ViM's subspace: 20)
    assert 'got 12; using dim 11' in text
    # repeated images span fewer dimensions than their count, fewer than or as many as ViM's subspace: it leaves a
    # residual still (it used to stop the run, "no component outside the principal subspace")
    for copies in (3, 6):  # 12 images (under ViM's dim 20: capped first), 24
        with pytest.warns(UserWarning, match=rf'ViM: the {4 * copies} fit images span 4 dimensions, no more than its '
                                             r'principal subspace \(dim \d+\); using dim 3'):
            vim = fit_detectors(f[:4].repeat(copies, 1), torch.arange(3).repeat(8)[:4 * copies], classifier,
                                knn_k=2, methods=('vim',))['vim']
        assert torch.isfinite(vim.score(f, classifier(f))).all()
    big = torch.randn(400, 40, generator=g)
    quiet = fit_detectors(big, torch.arange(4).repeat_interleave(100) % 3, classifier, knn_k=5)
    assert quiet['knn'].k == 5


def test_bootstrap_matches_explicit_resampling_with_ties():
    g = torch.Generator().manual_seed(1)
    s_id = torch.randint(0, 8, (37,), generator=g).float()
    s_ood = torch.randint(0, 6, (23,), generator=g).float() - 1
    boot = bootstrap_metrics(s_id, s_ood, 40, seed=3)
    gen = torch.Generator().manual_seed(3)  # the documented draw order: ID indices, then OOD indices
    i1, i0 = torch.randint(37, (40, 37), generator=gen), torch.randint(23, (40, 23), generator=gen)
    a, o = s_id.sort(descending=True).values, s_ood.sort().values
    for k in range(40):
        assert boot['fpr95'][k] == pytest.approx(metrics.fpr_at_tpr(a[i1[k]], o[i0[k]]), abs=1e-12)
        assert boot['auroc'][k] == pytest.approx(metrics.auroc(a[i1[k]], o[i0[k]]), abs=1e-12)
    # the interval: the 2.5th and 97.5th percentiles of those resamples (numpy's linear interpolation as oracle)
    import numpy as np
    ci = bootstrap_ci(s_id, s_ood, 40, seed=3)
    for key in ('fpr95', 'auroc'):
        assert ci[key] == pytest.approx(np.percentile(100 * np.array(boot[key]), [2.5, 97.5]), abs=1e-9)
    ci = bootstrap_ci(s_id, s_ood, 300)
    assert ci == bootstrap_ci(s_id, s_ood, 300)  # seeded
    assert ci['auroc'][0] < 100 * metrics.auroc(s_id, s_ood) < ci['auroc'][1]


def test_histograms_for_every_method_with_labelled_axes(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, 'set', lambda self, **kw: drawn.append(kw))
    s = {m: {'id': torch.rand(10), 'ood': torch.rand(8)} for m in ('ssod', 'msp', 'energy', 'knn')}
    # ODIN at T = 1000 scores 1/M give or take float32 rounding: a range too narrow for 40 bins, drawn as one
    s['odin'] = {'id': torch.nextafter(torch.full((10,), 0.25), torch.ones(10)), 'ood': torch.full((8,), 0.25)}
    plots.plot_histograms(s, tmp_path / 'h.png')
    assert len(drawn) == 5 and all(d['xlabel'] and d['ylabel'] for d in drawn)
    assert [d['title'].split(':')[0] for d in drawn] == ['ssod', 'msp', 'energy', 'knn', 'odin']


def test_fit_limit_takes_the_same_number_from_each_class():
    from collections import Counter

    from ssod_zoo.app.protocols import limited

    targets = [0] * 50 + [1] * 30 + [2] * 4  # unbalanced, as real fit sets are
    subset = limited(list(range(len(targets))), 20, targets)
    assert len(subset) == 20 and len(set(subset.indices)) == 20
    assert Counter(targets[i] for i in subset.indices) == {0: 8, 1: 8, 2: 4}  # class 2 gives all it has
    # seed 0 in every process and on every machine: torch's permutation of that seed, not one drawn per run
    assert limited(list(range(84)), 20).indices == torch.randperm(84, generator=torch.Generator().manual_seed(0))[
        :20].tolist()


def test_targets_follow_the_rows_a_protocol_wrapper_selects():
    """scores.csv's target column on a protocol set used to be the wrapped data set's labels, row for row."""
    from PIL import Image
    from torch.utils.data import Dataset, Subset

    from ssod_zoo.app.evaluate import _paths, _targets
    from ssod_zoo.app.protocols import ImageList, Transformed, _Classes

    class Source(Dataset):
        targets = [5, 7, 5, 9, 7]

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return Image.new('L', (4, 4)), self.targets[i]

    ds = Transformed(_Classes(Source(), [3, 1, 4], {7: 0, 9: 1}, ['seven', 'nine']), None)
    assert _targets(ds) == [ds[i][1] for i in range(len(ds))] == [1, 0, 0]
    assert _targets(Subset(ds, [2, 0])) == [0, 1]
    listed = Transformed(ImageList(Path('.'), [Path(f'{i}.png') for i in range(3)], [2, 0, 1]), None)  # OpenOOD's
    assert _targets(listed) == [2, 0, 1]
    assert _paths(Subset(listed, [2, 1])) == ['2.png', '1.png'] and _targets(Subset(listed, [2, 1])) == [1, 0]
    assert _paths(_Classes(listed, [0, 2], {2: 0, 1: 1}, ['a', 'b'])) == ['0.png', '2.png']  # through its rows


def test_scores_csv_names_the_row_of_an_in_memory_image():
    """A protocol's images come from no file: scores.csv names each by its row in the data set it comes from."""
    from torch.utils.data import Subset
    from torchvision.datasets import FakeData

    from ssod_zoo.app.evaluate import _rows
    from ssod_zoo.app.protocols import SyntheticFar, Transformed, _Classes

    class Split(FakeData):
        train = False

    source = Split(size=6, image_size=(1, 4, 4))
    ds = Transformed(Subset(_Classes(source, [5, 3, 1], {}, ['a']), [2, 0]), None)
    assert _rows(ds) == ['Split(test)[1]', 'Split(test)[5]']
    assert _rows(SyntheticFar(per_kind=1, seed=7))[:2] == ['SyntheticFar(seed 7)[0] constant',
                                                           'SyntheticFar(seed 7)[1] uniform']


def test_a_cross_entropy_model_under_test_is_named_as_one(data, tmp_path):
    """`ssod eval --model` of a twin: its ood_factor rows score a head never trained, and a warning says so."""
    twin = ssod_zoo.save_pretrained(ssod_zoo.load_model(data['ckpt']), tmp_path / 'ce', train_config={'ce_only': True})
    with pytest.warns(UserWarning, match=r'trained with cross-entropy alone .* measure nothing'):
        evaluate.main(['--model', str(twin), '--val-dir', str(data['val']), '--ood-dirs', str(data['flat']),
                       '--out', str(tmp_path / 'out'), '--workers', '0', '--no-plots', '--bootstrap', '0'])


def test_ood_folders_named_alike_or_like_the_reports_own_sets_are_kept_apart(data, tmp_path, capsys):
    """Two `photos` folders are both scored, and a folder named `id` or `average` does not take the place of the ID
    set or the average row: each gets as many of its last path parts as it needs."""
    from ssod_zoo.app.images import ood_set_names
    edge = tmp_path / 'edge'
    dirs = [save_images(edge / 'a' / 'photos', 3, seed=40), save_images(edge / 'b' / 'photos', 4, seed=41),
            save_images(edge / 'id', 5, seed=42), save_images(edge / 'average', 6, seed=43)]
    assert ood_set_names(dirs) == ['a/photos', 'b/photos', 'edge/id', 'edge/average']
    payload = evaluate.main(['--model', str(data['ckpt']), '--val-dir', str(data['val']), '--ood-dirs',
                             *map(str, dirs), '--out', str(tmp_path / 'out'), '--workers', '0', '--bootstrap', '0',
                             '--no-plots'])
    assert {k: v['n'] for k, v in payload['accept_rates']['ssod'].items()} == {
        'id': 12, 'a/photos': 3, 'b/photos': 4, 'edge/id': 5, 'edge/average': 6}
    out, err = capsys.readouterr()
    assert 'FPR95 OpenOOD' in out  # both conventions on the terminal, as in results.md
    # sets this small get the calibrate command's warning: up to 100 sqrt(0.25 / n) points
    assert 'warning: only 3 images in the OOD set a/photos: a rate measured on it (FPR95, accept rate) is ' \
           'uncertain by up to 29 points' in err and 'only 12 images in the ID set' in err
    with pytest.raises(SystemExit):
        evaluate.main(['--model', str(data['ckpt']), '--val-dir', str(data['val']), '--ood-dirs', str(dirs[0]),
                       str(dirs[0]), '--out', str(tmp_path / 'twice')])
    assert 'name the same folder twice' in capsys.readouterr().err


def test_scores_csv_reads_back_the_exact_scores(tmp_path):
    """ODIN's scores at T = 1000 differ in the 8th significant digit: written with any rounding they would tie,
    and metrics recomputed from the file would not be the reported ones."""
    from ssod_zoo.app.report import write_scores_csv
    odin = {'id': 0.25 + torch.arange(5, dtype=torch.float32) * 3e-8, 'near': torch.rand(3, dtype=torch.float64)}
    write_scores_csv({'odin': odin}, {}, tmp_path / 'scores.csv')
    with open(tmp_path / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    for name, values in odin.items():
        assert [float(r['odin']) for r in rows if r['set'] == name] == values.tolist()


def test_scoring_at_another_size_marks_the_accept_rates(data, tmp_path):
    """Accept rates at thresholds calibrated at one size, of images scored at another, are no deployment's: the
    terminal warns, and results.md and results.json say so beside the rates."""
    trained = ssod_zoo.load_model(str(data['ckpt'])).pretrained_cfg['input_size'][-1]
    argv = ['--model', str(data['ckpt']), '--val-dir', str(data['val']), '--ood-dirs', str(data['flat']),
            '--no-plots', '--bootstrap', '0', '--workers', '0']
    with pytest.warns(UserWarning, match=f'calibrated at {trained} px; scoring at {trained + 32} px'):
        payload = evaluate.main([*argv, '--out', str(tmp_path / 'other'), '--img-size', str(trained + 32)])
    note = f'**Scored at {trained + 32} px, with thresholds calibrated at {trained} px.**'
    assert payload['thresholds_note'].startswith(note) and note in (tmp_path / 'other' / 'results.md').read_text()
    payload = evaluate.main([*argv, '--out', str(tmp_path / 'same'), '--img-size', str(trained)])
    assert 'thresholds_note' not in payload and 'Scored at' not in (tmp_path / 'same' / 'results.md').read_text()


def test_fitted_baselines_get_the_fit_folder_and_knn_k(data, tmp_path, monkeypatch):
    """--fit-dir's images (not the ID test images) and --knn-k reach the fitted baselines."""
    from ssod_zoo.app.images import list_images
    fitted = []
    real = evaluate.fit_detectors

    def recording(features, targets, classifier, knn_k=50, *args, **kwargs):
        fitted.append((len(features), sorted(set(targets.tolist())), knn_k))
        return real(features, targets, classifier, knn_k, *args, **kwargs)
    monkeypatch.setattr(evaluate, 'fit_detectors', recording)
    evaluate.main(['--model', str(data['ckpt']), '--val-dir', str(data['val']), '--ood-dirs', str(data['flat']),
                   '--fit-dir', str(data['fit']), '--knn-k', '1', '--out', str(tmp_path), '--no-plots',
                   '--bootstrap', '0', '--workers', '0'])
    n_fit = len(list_images(data['fit']))
    assert n_fit != len(list_images(data['val']))
    assert fitted == [(n_fit, [0, 1, 2], 1)]
