"""Where does the classifier put confidence on the image's label, by distance from the object? Measured, not guessed.

The capacity run (``r18-96-scratch-e16``: ResNet-18 from scratch) sampled only 6.5% of positions as OOD, against
21-24% for the fine-tuned ``test_resnet`` runs, and only 76% of its OOD samples lay off the object (93-97%
elsewhere). This measures why. On the validation ID images (generator seed 1, object masks known), each feature-map
cell gets its Chebyshev distance in cells from the nearest cell the object touches (0: on the object), and for each
distance the mean softmax probability on the image's label and the fractions the sampler (Eq. 12, the run's gamma
and rule) labels ID and OOD, for the SSOD model and for its CE twin read out the same way. If confidence spreads
from the object to its neighbours, distance 1 carries it and far cells do not; if the network reads the whole image
at every cell, far cells carry it too. The CE twin separates what capacity does from what SSOD's objective does.

It also plots, from the two runs' training logs, the share of positions the sampler labelled OOD and ID in each
epoch (the CE twin's is computed with the same sampler on its own classifier, which never trains on it):
``drift.png``, one panel per pair.

Usage::

    python benchmarks/sampler_spread.py \
        --runs r18-96-scratch-e16-s0 scratch-e34-s0 lrdecay-e16-s0 scratch-detach-e34-s{0,1,2} \
        --ce-runs ce-batch_size64-epochs16-scratch-lr0.002-lr_step6-modelssod_resnet18-s0 \
                  ce-batch_size64-epochs34-scratch-lr0.002-lr_step12-s0 ce-batch_size64-epochs16-lr0.0005-lr_step4-s0 \
                  ce-batch_size64-epochs34-scratch-lr0.002-lr_step12-s{0,1,2}
"""
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, save_figure  # noqa: E402
from study import CACHE, benchmarks, run_pairs  # noqa: E402

from ssod_zoo.app import train as train_mod  # noqa: E402
from ssod_zoo.hub import load_checkpoint  # noqa: E402
from ssod_zoo.loss import ood_cutoff  # noqa: E402

OUT = RESULTS / 'sampler_spread'
TOUCH = 0.05  # a cell is on the object if the mask covers more than this of it (as study.sampler_cleanliness)
BINS = ('0 (on the object)', '1', '2', '3 or more')


def cell_distance(on: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool -> (B, h, w) int64 Chebyshev distance in cells to the nearest True cell, capped at 3."""
    dist = torch.full(on.shape, 3, dtype=torch.int64)
    reached = on.float()[:, None]
    for d in range(3):
        dist[(reached[:, 0] > 0) & (dist == 3)] = d
        reached = F.max_pool2d(reached, 3, stride=1, padding=1)
    return dist


@torch.no_grad()
def profile(model, x: torch.Tensor, labels: torch.Tensor, dist: torch.Tensor, gamma: float, cutoff: float) -> dict:
    conf = torch.cat([model.forward_spatial(xb).cls_map.float().softmax(1).gather(
        1, yb.view(-1, 1, 1, 1).expand(-1, 1, *dist.shape[1:])).squeeze(1)
        for xb, yb in zip(x.split(100), labels.split(100))])
    rows = []
    for d in range(len(BINS)):
        c = conf[dist == d]
        rows.append({'cells': int(c.numel()), 'mean_confidence': 100 * float(c.mean()) if c.numel() else None,
                     'sampled_id': 100 * float((c >= gamma).float().mean()) if c.numel() else None,
                     'sampled_ood': 100 * float((c < cutoff).float().mean()) if c.numel() else None})
    return {'by_distance': rows, 'sampled_ood_all': 100 * float((conf < cutoff).float().mean())}


def measure(run: str, ce_run: str) -> dict:
    val = benchmarks()['val']
    ssod, ckpt = load_checkpoint(CACHE / 'runs' / run / 'last.pt')
    ce, _ = load_checkpoint(CACHE / 'runs' / ce_run / 'last.pt')
    ssod.eval(), ce.eval()
    cfg = ckpt['config']
    gamma, cutoff = cfg['gamma'], ood_cutoff(cfg['gamma'], ssod.num_classes, cfg.get('ood_rule', 'paper'))
    tf = train_mod._transforms(ssod, train_mod.TrainConfig(img_size=cfg['img_size'], crop_pct=1.0))[1]
    n = val.config.split_size('val')
    samples = [val.render('val', i) for i in range(n)]
    x = torch.stack([tf(s.image) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    grid = ssod.forward_features(x[:1]).shape[-2:]
    masks = torch.stack([torch.from_numpy(s.mask).float() for s in samples])[:, None]
    dist = cell_distance(F.adaptive_avg_pool2d(masks, grid)[:, 0] > TOUCH)
    twin = ce.state_dict()
    return {'run': run, 'ce_run': ce_run, 'model': cfg['model'], 'grid': list(grid), 'images': n, 'gamma': gamma,
            'ood_cutoff': cutoff, 'ssod': profile(ssod, x, labels, dist, gamma, cutoff),
            'ce': profile(ce, x, labels, dist, gamma, cutoff),
            'per_epoch': {'ssod': per_epoch(CACHE / 'runs' / run), 'ce': per_epoch(CACHE / 'runs' / ce_run)},
            # --ood-detach leaves the backbone and classifier to the CE loss alone: are they the twin's, bit for bit?
            'differs_from_ce_twin': [k for k, v in ssod.state_dict().items()
                                     if k not in twin or not torch.equal(v, twin[k])]}


def per_epoch(run_dir: Path) -> Dict[str, List[float]]:
    """The sampler's shares of positions (%) in each training epoch, from the run's ``log.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / 'log.jsonl').read_text().splitlines() if line.strip()]
    return {k: [100 * r['train'][k] for r in rows] for k in ('frac_ood', 'frac_id')}


def write(records: List[dict], path: Path) -> None:
    lines = ['# Confidence on the label by distance from the object (validation ID images)', '',
             'Written by `python benchmarks/sampler_spread.py` (see its docstring). Each cell of the feature map: '
             'its Chebyshev distance in cells from the nearest cell the object touches (mask > '
             f'{TOUCH:.0%} of the cell); for each distance, the share of cells, the mean softmax probability on the '
             "image's label (%), and the sampler's ID (>= gamma) and OOD (< cutoff) fractions (%). SSOD model / "
             'its CE twin read out the same way (the CE twin is never trained on these labels).', '']
    for r in records:
        total = sum(b['cells'] for b in r['ssod']['by_distance'])
        lines += [f"## `{r['run']}` ({r['model']}, {r['grid'][0]}x{r['grid'][1]} map, {r['images']} images; "
                  f"CE twin `{r['ce_run']}`)", '',
                  f"Positions sampled OOD: SSOD {r['ssod']['sampled_ood_all']:.1f}%, CE twin "
                  f"{r['ce']['sampled_ood_all']:.1f}%. Parameters and buffers that differ from the CE twin's: "
                  f"{_names_or_count(r['differs_from_ce_twin'])}.", '']

        def pair(d: int, key: str) -> str:
            a, b = r['ssod']['by_distance'][d][key], r['ce']['by_distance'][d][key]
            return '-' if a is None else f'{a:.1f} / {b:.1f}'
        rows = [[BINS[d], f"{100 * r['ssod']['by_distance'][d]['cells'] / total:.1f}",
                 pair(d, 'mean_confidence'), pair(d, 'sampled_id'), pair(d, 'sampled_ood')]
                for d in range(len(BINS))]
        lines += [markdown_table(['distance (cells)', 'cells %', 'confidence on the label, SSOD / CE',
                                  'sampled ID, SSOD / CE', 'sampled OOD, SSOD / CE'], rows), '']
    lines += ['## The sampler over training', '', '![share of positions sampled OOD and ID per epoch](drift.png)', '',
              'Positions sampled OOD (%): first epoch, the peak (its epoch), last epoch:', '']

    def course(series: List[float]) -> str:
        peak = max(range(len(series)), key=series.__getitem__)
        return f'{series[0]:.1f}, {series[peak]:.1f} (epoch {peak + 1}), {series[-1]:.1f}'
    lines += [f"- `{r['run']}`: SSOD {course(r['per_epoch']['ssod']['frac_ood'])}; CE twin "
              f"{course(r['per_epoch']['ce']['frac_ood'])}" for r in records]
    path.write_text('\n'.join(lines) + '\n')
    plot_drift(records, path.parent / 'drift.png')


def plot_drift(records: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = min(3, len(records))
    rows = -(-len(records) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(records):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, records):
        for model, style in (('ssod', '-'), ('ce', '--')):
            series = r['per_epoch'][model]
            epochs = range(1, len(series['frac_ood']) + 1)
            who = 'SSOD' if model == 'ssod' else 'CE twin'
            ax.plot(epochs, series['frac_ood'], style, color='tab:blue', label=f'{who}: sampled OOD')
            ax.plot(epochs, series['frac_id'], style, color='tab:orange', label=f'{who}: sampled ID')
        ax.set_title(f"{r['run']} ({r['model'].replace('ssod_', '')})", fontsize=9)
        ax.set_xlabel('epoch')
    for row in axes:
        row[0].set_ylabel('positions (%)')
    axes[0][-1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def _names_or_count(keys: List[str]) -> str:
    return ', '.join(keys) if len(keys) <= 4 else str(len(keys))


def _describe(r: dict) -> str:
    return ', '.join(f"d{d}: conf {b['mean_confidence']:.1f} ood {b['sampled_ood']:.1f}"
                     for d, b in enumerate(r['ssod']['by_distance']) if b['cells'])


def main(argv: Optional[List[str]] = None) -> None:
    run_pairs(argv, __doc__, OUT, measure, write, _describe)


if __name__ == '__main__':
    main()
