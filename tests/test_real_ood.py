"""benchmarks/real_ood.py's real-image OOD sets: GIMP's pattern format, the crops, what a missing package says."""
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def real(benchmark_script):
    return benchmark_script('real_ood')


def write_pattern(path: Path, img: Image.Image, name: bytes = b'test pattern') -> None:
    """A ``.pat`` file as GIMP writes one (app/core/gimppattern-load.c): a 24-byte big-endian header and the
    pattern's name (null-terminated), then the pixels."""
    depth = {'L': 1, 'LA': 2, 'RGB': 3, 'RGBA': 4}[img.mode]
    header = 24 + len(name) + 1
    path.write_bytes(struct.pack('>5I', header, 1, img.width, img.height, depth) + b'GPAT' + name + b'\0'
                     + img.tobytes())


@pytest.mark.parametrize('mode', ['RGB', 'L', 'RGBA'])
def test_a_pattern_reads_back_its_pixels(real, tmp_path, mode):
    rng = np.random.default_rng(0)
    channels = {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]
    pixels = rng.integers(0, 256, (7, 5, channels), dtype=np.uint8)  # not square: width and height in order
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    write_pattern(tmp_path / 'p.pat', img)
    got = real.read_pattern(tmp_path / 'p.pat')
    assert got.mode == 'RGB' and got.size == (5, 7)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(img.convert('RGB')))


def test_a_file_that_is_no_pattern_is_refused(real, tmp_path):
    (tmp_path / 'x.pat').write_bytes(struct.pack('>5I', 24, 1, 2, 2, 3) + b'GIMP' + bytes(12))
    with pytest.raises(ValueError, match='not a GIMP pattern'):
        real.read_pattern(tmp_path / 'x.pat')


def test_tile_repeats_the_pattern(real):
    img = Image.fromarray(np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3))
    canvas = np.asarray(real.tile(img, 10))
    assert canvas.shape == (10, 10, 3)
    np.testing.assert_array_equal(canvas, np.tile(np.asarray(img), (4, 3, 1))[:10, :10])


def test_crops_are_fixed_by_the_seed_and_inside_the_image(real):
    images = [Image.new('RGB', (50, 30), 'red'), Image.new('RGB', (20, 40), 'blue')]
    side = lambda rng, img: rng.randint(5, min(img.size))  # noqa: E731
    a = real.Crops(images, 6, side, transform=lambda im: im.size)
    b = real.Crops(images, 6, side, transform=lambda im: im.size)
    assert len(a) == 12 and a.boxes == b.boxes
    assert a.boxes != real.Crops(images, 6, side, transform=lambda im: im.size, seed=1).boxes
    for i, (left, top, right, bottom) in a.boxes:
        assert right - left == bottom - top and 0 <= left and right <= images[i].width and bottom <= images[i].height
    size, label = a[7]
    assert label == -1 and size[0] == size[1] == a.boxes[7][1][2] - a.boxes[7][1][0]


def test_missing_packages_say_what_to_install(real, tmp_path):
    with pytest.raises(SystemExit, match='apt-get install mate-backgrounds gimp-data'):
        real.real_sets(lambda im: im, photos=tmp_path / 'none', patterns=tmp_path)


def test_real_sets_leave_out_the_drawn_patterns(real, tmp_path):
    photos, patterns = tmp_path / 'photos', tmp_path / 'patterns'
    photos.mkdir()
    Image.new('RGB', (80, 60), 'green').save(photos / 'a.jpg')
    for folder in ('Stone', 'Legacy'):
        (patterns / folder).mkdir(parents=True)
        write_pattern(patterns / folder / 'p.pat', Image.new('RGB', (16, 16), 'grey'))
    sets = real.real_sets(lambda im: im.size, photos=photos, patterns=patterns)
    assert len(sets['photos']) == 40 and len(sets['patterns']) == 12  # Legacy/ left out
    assert all(18 <= s[0] <= 60 for s, _ in (sets['photos'][i] for i in range(40)))  # 30-100% of the short side
