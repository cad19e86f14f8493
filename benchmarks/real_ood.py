"""Does the study's chosen readout hold on real images? Photographs and textures from Debian packages.

The issue warns that results are also checked on OOD data the project does not contain, real photographs and
textures included. Its own check of an earlier 8-epoch model, on six unseen sets, put the mean MaxLogit of the 3
best positions at 58.9 against ReAct's 41.8. The study's validation sets hold one real set, Fashion-MNIST, on which
every position readout reads 0.0: too easy to tell anything. This scores the headline's models (``lrdecay-e16``,
seeds 0-2, and their CE twins) on two sets of real images that no choice of the study has seen:

- ``photos``: the 12 nature photographs of Debian's ``mate-backgrounds`` (``/usr/share/backgrounds/mate/nature``:
  flowers, grass, leaves, a ladybird, raindrops, a dune, a storm, wood). 40 random square crops of each, with sides
  of 30-100% of the photograph's short side: 480 images.
- ``patterns``: the 43 texture patterns of ``gimp-data`` outside ``Legacy/`` (``/usr/share/gimp/2.0/patterns``,
  mostly photographs: stone, wood, water, sky, fabric, paper, leaves, animal skins). The 15 drawn ones in
  ``Legacy/`` are left out. Each pattern is tiled, as GIMP fills with it, and cut into 12 random square crops of
  48-256 px: 516 images.

``samples.png`` shows 24 crops of each set.

The ID images are the embedded benchmark's ID validation images (generator seed 0, those of the study's test
grid). The models see every image through their own evaluation transform (96 px). This is a report on the
configuration already chosen, made after the choice: it chooses nothing.

Prediction, written before the first run (3-seed means of the average over the two sets, FPR95):
(1) the SSOD model's 3 best positions beat the best of the 8 post-hoc baselines on the CE twin, but by less than
the 7.3 points of the test sets; (2) they are within 2 points of the same readout on the CE twin; (3) Eq. 15
trails the best of the 8; (4) the SSOD model's pooled Energy beats its twin's in at least 2 of 3 seeds.

Usage (as root, once: ``apt-get install mate-backgrounds gimp-data``)::

    python benchmarks/real_ood.py   # lrdecay-e16 seeds 0-2 and their CE twins, from the study's cache
    python benchmarks/real_ood.py --runs scratch-e34-s0 --ce-runs ce-batch_size64-epochs34-scratch-lr0.002-lr_step12-s0
"""
import random
import struct
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, mean_sd, save_figure  # noqa: E402
from study import CACHE, CHOICE_RUNS, EIGHT, benchmarks, evaluate_pair, run_pairs  # noqa: E402

from ssod_zoo.app import train as train_mod  # noqa: E402
from ssod_zoo.hub import load_checkpoint  # noqa: E402

OUT = RESULTS / 'real_ood'
PHOTOS = Path('/usr/share/backgrounds/mate/nature')  # Debian: mate-backgrounds
PATTERNS = Path('/usr/share/gimp/2.0/patterns')  # Debian: gimp-data
SETS = ('photos', 'patterns')
# the readouts the summary reports (the study's names), beside the 8 baselines on the CE twin
READOUTS = {'pos_top3_maxlogit': 'the 3 best positions (SSOD; the study\'s chosen readout)',
            'ce_pos_top3_maxlogit': 'the 3 best positions (CE twin)',
            'pos_max_energy': 'best-position energy (SSOD)', 'ce_pos_max_energy': 'best-position energy (CE twin)',
            'ssod': 'Eq. 15, pooled OOD factor (SSOD)', 'ssod_posterior': 'full posterior, pooled (SSOD)',
            'ssod_energy': 'pooled Energy (SSOD)', 'energy': 'pooled Energy (CE twin)'}


def read_pattern(path: Path) -> Image.Image:
    """A GIMP pattern (``.pat``, which Pillow does not read): a big-endian header (its size, version, width, height,
    bytes per pixel, the magic ``GPAT``, a name) and then the raw pixels, row by row."""
    data = Path(path).read_bytes()
    header, _, width, height, depth = struct.unpack('>5I', data[:20])
    if data[20:24] != b'GPAT' or depth not in (1, 2, 3, 4):
        raise ValueError(f'{path} is not a GIMP pattern')
    mode = {1: 'L', 2: 'LA', 3: 'RGB', 4: 'RGBA'}[depth]
    return Image.frombytes(mode, (width, height), data[header:header + width * height * depth]).convert('RGB')


def tile(img: Image.Image, size: int) -> Image.Image:
    """``img`` repeated over a ``size`` x ``size`` canvas, as GIMP fills an area with a pattern."""
    canvas = Image.new('RGB', (size, size))
    for top in range(0, size, img.height):
        for left in range(0, size, img.width):
            canvas.paste(img, (left, top))
    return canvas


class Crops(Dataset):
    """``per_image`` random square crops of each source image, side ``side(rng, img)``, label -1 (OOD); the crops
    are drawn once from ``seed``, so the set is the same on every machine."""

    def __init__(self, images: Sequence[Image.Image], per_image: int, side, transform, seed: int = 0):
        rng = random.Random(seed)
        self.images, self.transform, self.boxes = list(images), transform, []
        for i, img in enumerate(self.images):
            for _ in range(per_image):
                s = side(rng, img)
                left, top = rng.randint(0, img.width - s), rng.randint(0, img.height - s)
                self.boxes.append((i, (left, top, left + s, top + s)))

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, k: int) -> Tuple[torch.Tensor, int]:
        i, box = self.boxes[k]
        return self.transform(self.images[i].crop(box)), -1


def real_sets(transform, photos: Path = PHOTOS, patterns: Path = PATTERNS) -> Dict[str, Dataset]:
    missing = [f'{p} (Debian package {pkg})' for p, pkg in ((photos, 'mate-backgrounds'), (patterns, 'gimp-data'))
               if not p.is_dir()]
    if missing:
        raise SystemExit(f'not found: {", ".join(missing)}. Install them as root: '
                         'apt-get install mate-backgrounds gimp-data')
    shots = [Image.open(p).convert('RGB') for p in sorted(photos.glob('*.jpg'))]
    tiles = [tile(read_pattern(p), 256) for p in sorted(patterns.glob('*/*.pat')) if p.parent.name != 'Legacy']
    return {'photos': Crops(shots, 40, lambda rng, img: int(min(img.size) * rng.uniform(0.3, 1.0)), transform),
            'patterns': Crops(tiles, 12, lambda rng, img: rng.randint(48, 256), transform, seed=1)}


def measure(run: str, ce_run: str) -> dict:
    benches = benchmarks()
    model, ckpt = load_checkpoint(CACHE / 'runs' / run / 'last.pt')
    tf = train_mod._transforms(model, train_mod.TrainConfig(img_size=ckpt['config']['img_size'], crop_pct=1.0))[1]
    test = benches['test']
    sets = {'id': test.val_dataset(tf), **real_sets(tf)}
    result = evaluate_pair(CACHE / 'runs' / run, CACHE / 'runs' / ce_run, sets, test.train_dataset(tf), test, tf)
    return {'run': run, 'ce_run': ce_run, **result}


def best_of_eight(r: dict, s: str) -> Tuple[str, float]:
    return min(((m, r['ood'][s][m]['fpr95']) for m in EIGHT), key=lambda t: t[1])


def write(results: List[dict], path: Path) -> None:
    cols = (*SETS, 'average')
    chosen = [r['run'] for r in results] == CHOICE_RUNS
    lines = ['# Real photographs and textures as OOD data (a report on the '
             + ('chosen configuration)' if chosen else 'runs below, not the chosen configuration)'), '',
             'Written by `python benchmarks/real_ood.py` (its docstring gives the sets and the prediction written '
             f'before the first run). FPR95 (%), ID positive; mean ± sd over {len(results)} runs: '
             + ', '.join(f'`{r["run"]}`' for r in results) + ', each against its CE twin. '
             f'{results[0]["counts"]["id"]} ID images; ' + ', '.join(
                 f'{results[0]["counts"][s]} {s}' for s in SETS) + '.', '',
             f'| readout | {" | ".join(cols)} | average AUROC |', '|---|' + '---:|' * (len(cols) + 1)]
    for m, label in {**READOUTS, **{m: f'{m} (CE twin)' for m in EIGHT}}.items():
        lines.append(f'| {label} | ' + ' | '.join(mean_sd([r['ood'][s][m]['fpr95'] for r in results]) for s in cols)
                     + f' | {mean_sd([r["ood"]["average"][m]["auroc"] for r in results])} |')
    lines.append('| best of the 8 (CE twin), per run | ' + ' | '.join(
        mean_sd([best_of_eight(r, s)[1] for r in results]) for s in cols) + ' | |')
    lines += ['', 'Per run (FPR95 average over the two sets): the 3 best positions on SSOD / on the CE twin; the best '
              'of the 8; Eq. 15; pooled Energy SSOD / CE twin; ID accuracy SSOD / CE.', '']
    for r in results:
        a = r['ood']['average']
        name, best = best_of_eight(r, 'average')
        lines.append(f'- `{r["run"]}`: {a["pos_top3_maxlogit"]["fpr95"]:.2f} / {a["ce_pos_top3_maxlogit"]["fpr95"]:.2f}'
                     f'; {best:.2f} ({name}); {a["ssod"]["fpr95"]:.2f}; {a["ssod_energy"]["fpr95"]:.2f} / '
                     f'{a["energy"]["fpr95"]:.2f}; {r["id_accuracy"]["ssod"]:.1f} / {r["id_accuracy"]["ce"]:.1f}')
    path.write_text('\n'.join(lines) + '\n')
    # the chosen runs' plot is real_ood.png (README shows it); other runs' go beside their summary
    plot(results, path.with_name('real_ood.png') if chosen else path.with_suffix('.png'))


PLOTTED = {'pos_top3_maxlogit': ('3 best positions (SSOD)', 'tab:red'),
           'ce_pos_top3_maxlogit': ('3 best positions (CE twin)', 'tab:pink'),
           'best': ('best of the 8 post-hoc (CE twin)', 'tab:gray'), 'ssod': ('Eq. 15 (SSOD)', 'tab:orange'),
           'ssod_energy': ('pooled Energy (SSOD)', 'tab:blue'), 'energy': ('pooled Energy (CE twin)', 'tab:cyan')}


def plot(results: List[dict], path: Path) -> None:
    """FPR95 per set of a few readouts: bars are the mean over runs, dots the runs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = (*SETS, 'average')
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(PLOTTED)
    for j, (m, (label, colour)) in enumerate(PLOTTED.items()):
        for i, s in enumerate(cols):
            vals = [best_of_eight(r, s)[1] if m == 'best' else r['ood'][s][m]['fpr95'] for r in results]
            x = i + j * width
            ax.bar(x, sum(vals) / len(vals), width, color=colour, label=label if i == 0 else None)
            ax.plot([x] * len(vals), vals, 'k.', markersize=3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))])
    ax.set_xticklabels(cols)
    ax.set_ylabel('FPR95 (%), lower is better')
    ax.set_title('Real photographs and textures as OOD data (dots: runs)', fontsize=10)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def _describe(r: dict) -> str:
    a = r['ood']['average']
    name, best = best_of_eight(r, 'average')
    return (f'3 best positions {a["pos_top3_maxlogit"]["fpr95"]:.1f} (CE twin {a["ce_pos_top3_maxlogit"]["fpr95"]:.1f})'
            f', best of the 8 {best:.1f} ({name}), Eq. 15 {a["ssod"]["fpr95"]:.1f}')


def contact_sheet(path: Path, per_set: int = 24, size: int = 64) -> None:
    """``per_set`` crops of each set, evenly spaced, two rows per set: what the models are shown."""
    sets = real_sets(lambda img: img.resize((size, size), Image.BILINEAR))
    half = per_set // 2
    sheet = Image.new('RGB', (half * size, 2 * len(sets) * size))
    for row, ds in enumerate(sets.values()):
        for c in range(per_set):
            sheet.paste(ds[c * len(ds) // per_set][0], ((c % half) * size, (2 * row + c // half) * size))
    sheet.save(path)


def main(argv=None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    contact_sheet(OUT / 'samples.png')
    run_pairs(argv, __doc__, OUT, measure, write, _describe)


if __name__ == '__main__':
    main()
