"""The synthetic benchmark: deterministic, honest about its OOD sets, and a cache that never lies."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssod_zoo.app import synthetic
from ssod_zoo.app.synthetic import (
    ID_SHAPES, NEAR_SHAPES, OBJECT_AREA, OOD_SETS, BenchmarkConfig, SyntheticBenchmark, render)

TINY = BenchmarkConfig(num_classes=3, image_size=64, train_per_class=4, val_per_class=2, ood_per_set=3, seed=0)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*.png'))}


def _auroc(a: np.ndarray, b: np.ndarray) -> float:
    """P(a > b) + P(a == b) / 2, via ranks."""
    x = np.concatenate([a, b])
    order = x.argsort(kind='stable')
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # average ranks of ties
        ranks[x == v] = ranks[x == v].mean()
    return float((ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def test_render_is_deterministic_and_seeded():
    a, b = render('train', 5), render('train', 5)
    assert a.image.tobytes() == b.image.tobytes() and np.array_equal(a.mask, b.mask) and a.label == b.label
    other = render('train', 5, BenchmarkConfig(seed=1))
    assert other.image.tobytes() != a.image.tobytes()
    # neighbouring indices and splits are different images, not shifted copies of one stream
    assert render('train', 6).image.tobytes() != a.image.tobytes()
    assert render('val', 5).image.tobytes() != a.image.tobytes()


def test_disk_bytes_independent_of_worker_count_and_seeded(tmp_path):
    one = SyntheticBenchmark(tmp_path / 'one', TINY).prepare(workers=1, progress=False)
    calls = []
    two = SyntheticBenchmark(tmp_path / 'two', TINY).prepare(workers=2, progress=lambda d, t: calls.append((d, t)))
    files_one, files_two = _files(one.root), _files(two.root)
    n = sum(TINY.split_size(s) for s in ('train', 'val') + OOD_SETS)
    assert len(files_one) == n
    assert files_one == files_two
    assert calls[-1] == (n, n)
    reseeded = dataclasses.replace(TINY, seed=7)
    files_seven = _files(SyntheticBenchmark(tmp_path / 'seven', reseeded).prepare(workers=1, progress=False).root)
    assert files_seven.keys() == files_one.keys()
    assert all(files_seven[k] != files_one[k] for k in files_one)
    # what is on disk is exactly what render() gives
    disk = Image.open(one.root / 'ood' / 'near' / 'near' / '000002.png').convert('RGB')
    assert disk.tobytes() == render('near', 2, TINY).image.tobytes()


def test_every_class_renders_with_its_label():
    config = BenchmarkConfig(num_classes=len(ID_SHAPES))
    masks = []
    for c, name in enumerate(config.class_names):
        image, mask, label = render('train', c, config)
        assert label == c and image.size == (96, 96) and image.mode == 'RGB'
        assert mask.shape == (96, 96) and mask.dtype == bool and mask.any()
        masks.append(mask)
    assert len({m.tobytes() for m in masks}) == len(masks)
    assert config.class_names == sorted(config.class_names)
    assert BenchmarkConfig(num_classes=4).class_names == sorted(ID_SHAPES[:4])


@pytest.mark.parametrize('split', ['train', 'val', 'near'])
def test_object_covers_a_minority_of_the_image(split):
    fractions, background_cells = [], []
    for i in range(60):
        mask = render(split, i).mask
        fractions.append(mask.mean())
        # 6x6 cells of an output-stride-16 feature map: SSOD needs cells with no object in them
        background_cells.append((mask.reshape(6, 16, 6, 16).sum((1, 3)) == 0).sum())
    fractions = np.array(fractions)
    assert OBJECT_AREA[0] <= fractions.min() and fractions.max() <= OBJECT_AREA[1], (fractions.min(), fractions.max())
    assert fractions.max() - fractions.min() > 0.1  # sizes vary, not one fixed scale
    assert min(background_cells) >= 6


def test_ood_sets_have_the_documented_content(monkeypatch):
    drawn = []
    real = synthetic._object_scene
    monkeypatch.setattr(synthetic, '_object_scene', lambda rng, name, size: drawn.append(name) or real(rng, name, size))
    for i in range(12):
        render('near', i)
    assert sorted(set(drawn)) == sorted(NEAR_SHAPES)
    drawn.clear()
    for i in range(12):
        render('train', i)
    assert set(drawn) == set(BenchmarkConfig().class_names)
    for i in range(20):
        image, mask, label = render('textures', i)
        assert label == -1 and not mask.any()
        assert np.asarray(image).std() > 5  # a cluttered background, not a blank frame
        assert render('near', i).mask.any() and render('domain', i).mask.any()
        assert render('near', i).label == render('domain', i).label == -1
    with pytest.raises(ValueError):
        render('test', 0)
    with pytest.raises(IndexError):
        render('near', BenchmarkConfig().ood_per_set)


def _poses(name: str, size: int = 48) -> np.ndarray:
    """(72, size, size) bool: the shape at equal area, centred on its centroid, in 36 rotations x mirror."""
    polys, out = synthetic._SHAPES[name](), []
    scale = np.sqrt(0.25 * size * size / synthetic._unit_area(name))
    for mirror in (1, -1):
        for angle in np.linspace(0, 2 * np.pi, 36, endpoint=False):
            m = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([mirror, 1])
            m = m * scale
            pts = np.concatenate([p for sign, p in polys if sign > 0]) @ m.T
            centre = size / 2 - (pts.min(0) + pts.max(0)) / 2
            out.append(synthetic._rasterise(polys, size, lambda p: p @ m.T + centre) >= 0.5)
    return np.stack(out)


def test_near_shapes_are_disjoint_from_id_classes():
    assert not set(NEAR_SHAPES) & set(ID_SHAPES)
    assert len(set(ID_SHAPES)) == len(ID_SHAPES) and len(set(NEAR_SHAPES)) == len(NEAR_SHAPES)
    poses = {name: _poses(name) for name in ID_SHAPES + NEAR_SHAPES}

    def best_iou(a: str, b: str) -> float:
        x, y = poses[a][:1], poses[b]
        return float(((x & y).sum((1, 2)) / (x | y).sum((1, 2))).max())

    # the same shape in another pose scores ~1; distinct shapes stay well below
    assert best_iou('star', 'star') > 0.95
    for near in NEAR_SHAPES:
        for name in ID_SHAPES:
            assert best_iou(near, name) < 0.9, (near, name)
    for i, a in enumerate(ID_SHAPES):
        for b in ID_SHAPES[i + 1:]:
            assert best_iou(a, b) < 0.9, (a, b)


def test_no_global_colour_statistic_separates_an_ood_set():
    def stats(split):
        x = np.stack([np.asarray(render(split, i, BenchmarkConfig(image_size=48)).image) for i in range(120)])
        x = x.astype(np.float32) / 255
        hi, lo = x.max(-1), x.min(-1)
        return {'brightness': x.mean((1, 2, 3)), 'saturation': ((hi - lo) / np.maximum(hi, 1e-6)).mean((1, 2))}

    reference = stats('val')
    for name in OOD_SETS:
        for key, values in stats(name).items():
            auroc = _auroc(reference[key], values)
            assert 0.25 < auroc < 0.75, (name, key, auroc)


def test_imagefolder_datasets(tmp_path):
    bench = SyntheticBenchmark(tmp_path / 'bench', TINY)
    with pytest.raises(RuntimeError, match='prepare'):
        bench.train_dataset()
    bench.prepare(workers=1, progress=False)
    train, val, ood = bench.train_dataset(), bench.val_dataset(), bench.ood_datasets()
    assert train.classes == bench.class_names and val.classes == bench.class_names
    assert train.class_to_idx == {name: i for i, name in enumerate(bench.class_names)}
    assert len(train) == 3 * 4 and len(val) == 3 * 2
    assert np.bincount(train.targets).tolist() == [4, 4, 4]
    for path, target in train.samples:
        assert target == int(Path(path).stem) % TINY.num_classes
    image, target = train[0]
    assert image.size == (64, 64) and image.mode == 'RGB'
    assert list(ood) == list(OOD_SETS) == list(bench.ood_sets)
    assert all(len(ds) == 3 for ds in ood.values())
    meta = json.loads((bench.root / 'benchmark.json').read_text())
    assert meta['config'] == dataclasses.asdict(TINY) and meta['version'] == synthetic.GENERATOR_VERSION


def test_cache_is_reused_and_invalidated(tmp_path):
    root = tmp_path / 'bench'
    SyntheticBenchmark(root, TINY).prepare(workers=1, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob('*')}
    calls = []
    SyntheticBenchmark(root, TINY).prepare(workers=1, progress=lambda d, t: calls.append(d))
    assert calls == [] and {p: p.stat().st_mtime_ns for p in root.rglob('*')} == mtimes

    # a missing image invalidates the cache
    victim = root / 'id' / 'val' / TINY.class_names[1] / '000004.png'
    victim.unlink()
    assert not SyntheticBenchmark(root, TINY).is_prepared()
    SyntheticBenchmark(root, TINY).prepare(workers=1, progress=False)
    assert victim.exists()

    # another config replaces it
    changed = dataclasses.replace(TINY, seed=3, ood_per_set=2)
    bench = SyntheticBenchmark(root, changed)
    assert not bench.is_prepared()
    bench.prepare(workers=1, progress=False)
    assert bench.is_prepared() and not SyntheticBenchmark(root, TINY).is_prepared()
    assert len(bench.ood_datasets()['near']) == 2
    assert json.loads((root / 'benchmark.json').read_text())['config']['seed'] == 3


def test_interrupted_generation_leaves_no_accepted_cache(tmp_path, monkeypatch):
    root = tmp_path / 'bench'
    real, done = synthetic._render_chunk, []

    def flaky(job):
        if done:
            raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-way
        done.append(job)
        return real(job)

    monkeypatch.setattr(synthetic, '_render_chunk', flaky)
    with pytest.raises(KeyboardInterrupt):
        SyntheticBenchmark(root, TINY).prepare(workers=1, progress=False)
    assert done  # it really stopped part-way
    assert not SyntheticBenchmark(root, TINY).is_prepared()
    assert not root.exists() and list(tmp_path.iterdir()) == []

    # interrupting a regeneration keeps the previous, complete benchmark for its own config only
    monkeypatch.setattr(synthetic, '_render_chunk', real)
    SyntheticBenchmark(root, TINY).prepare(workers=1, progress=False)
    done.clear()  # so the regeneration, too, stops after its first chunk, part-way
    monkeypatch.setattr(synthetic, '_render_chunk', flaky)
    changed = dataclasses.replace(TINY, seed=5)
    with pytest.raises(KeyboardInterrupt):
        SyntheticBenchmark(root, changed).prepare(workers=1, progress=False)
    assert len(done) == 1
    assert not SyntheticBenchmark(root, changed).is_prepared()
    assert SyntheticBenchmark(root, TINY).is_prepared()
    assert [p.name for p in tmp_path.iterdir()] == ['bench']

    monkeypatch.setattr(synthetic, '_render_chunk', real)
    assert SyntheticBenchmark(root, changed).prepare(workers=1, progress=False).is_prepared()


def test_prepare_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / 'mine.txt').write_text('keep me')
    with pytest.raises(FileExistsError):
        SyntheticBenchmark(tmp_path, TINY).prepare(workers=1, progress=False)
    assert (tmp_path / 'mine.txt').read_text() == 'keep me'
