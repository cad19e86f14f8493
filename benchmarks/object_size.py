"""Does SSOD's pooled OOD factor work better when the object fills more of the image? Measured inside the benchmark.

The paper's benchmarks are object-centric; here objects cover 8-30% of the image (``synthetic.OBJECT_AREA``).
Rather than change the generator, this splits the *validation* ID images (generator seed 1, whose object masks are
known) into thirds by object area and scores each third against the same validation OOD sets, with the study's
readouts of an SSOD model and its CE twin. If Eq. 15 trails because the pooled feature is mostly background, its
FPR95 should fall steeply from the smallest third to the largest, and faster than the other readouts'.

Usage::

    python benchmarks/object_size.py   # the three lrdecay-e16 runs and their CE twins
    python benchmarks/object_size.py --runs paper-e8-s{0,1,2} --ce-runs ce-batch_size64-epochs8-lr0.0005-s{0,1,2} \
        --summary summary_paper-e8.md
"""
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, mean_sd  # noqa: E402
from study import CACHE, benchmarks, eval_sets, run_pairs  # noqa: E402

from ssod_zoo.app import train as train_mod  # noqa: E402
from ssod_zoo.hub import load_checkpoint  # noqa: E402
from ssod_zoo.metrics import ood_metrics  # noqa: E402
from ssod_zoo.output import spatial_maxlogit_score  # noqa: E402

OUT = RESULTS / 'object_size'
SETS = ('near', 'textures', 'domain')
READOUTS = {  # name: (model, what it reads)
    'ssod': 'Eq. 15, pooled OOD factor (SSOD)', 'ssod_energy': 'pooled Energy (SSOD)',
    'ssod_top3': 'mean MaxLogit of the 3 best positions (SSOD)', 'ce_energy': 'pooled Energy (CE twin)',
    'ce_top3': 'mean MaxLogit of the 3 best positions (CE twin)'}


@torch.no_grad()
def scores(ssod, ce, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    s, c = ssod.forward_spatial(x), ce.forward_spatial(x)
    return {'ssod': torch.sigmoid(s.ood_logits[:, 1] - s.ood_logits[:, 0]),
            'ssod_energy': s.logits.logsumexp(1), 'ssod_top3': spatial_maxlogit_score(s.cls_map, k=3),
            'ce_energy': c.logits.logsumexp(1), 'ce_top3': spatial_maxlogit_score(c.cls_map, k=3)}


def score_loader(ssod, ce, loader) -> Dict[str, torch.Tensor]:
    parts = [scores(ssod, ce, x) for x, _ in loader]
    return {k: torch.cat([p[k] for p in parts]) for k in READOUTS}


def measure(run: str, ce_run: str) -> dict:
    benches = benchmarks()
    ssod, ckpt = load_checkpoint(CACHE / 'runs' / run / 'last.pt')
    ce, _ = load_checkpoint(CACHE / 'runs' / ce_run / 'last.pt')
    ssod.eval(), ce.eval()
    tf = train_mod._transforms(ssod, train_mod.TrainConfig(img_size=ckpt['config']['img_size'], crop_pct=1.0))[1]
    val = benches['val']
    n = val.config.split_size('val')
    samples = [val.render('val', i) for i in range(n)]
    area = torch.tensor([float(s.mask.mean()) for s in samples])
    x = torch.stack([tf(s.image) for s in samples])
    id_scores = {k: torch.cat(v) for k, v in
                 zip(READOUTS, zip(*[scores(ssod, ce, xb).values() for xb in x.split(100)]))}
    sets = eval_sets(benches, 'val', tf)
    ood = {name: score_loader(ssod, ce, DataLoader(sets[name], batch_size=128, num_workers=2)) for name in SETS}
    edges = torch.quantile(area, torch.tensor([1 / 3, 2 / 3]))
    labels = torch.tensor([s.label for s in samples])
    splits = {'thirds': torch.bucketize(area, edges),  # 0, 1, 2: smallest to largest objects
              # the same within each class (object area depends on the shape): every third has every class
              'thirds_within_class': within_class_thirds(area, labels)}
    out = {'run': run, 'ce_run': ce_run, 'images': n, 'area_edges': edges.tolist(),
           'area_range': [float(area.min()), float(area.max())]}
    for key, third in splits.items():
        out[key] = []
        for t in range(3):
            pick = third == t
            row = {'area_mean': float(area[pick].mean()), 'images': int(pick.sum()), 'fpr95': {}, 'auroc': {}}
            for k in READOUTS:
                per = {s: ood_metrics(id_scores[k][pick], ood[s][k]) for s in SETS}
                row['fpr95'][k] = 100 * sum(float(m['fpr95']) for m in per.values()) / len(SETS)
                row['auroc'][k] = 100 * sum(float(m['auroc']) for m in per.values()) / len(SETS)
            out[key].append(row)
    return out


def within_class_thirds(area: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0, 1, 2 for the smallest, middle and largest third of the objects *of each class*."""
    third = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        ranks = area[idx].argsort().argsort()
        third[idx] = (3 * ranks) // len(idx)
    return third


def write(results: List[dict], path: Path) -> None:
    lines = ['# OOD detection by object size (validation)', '',
             'Written by `python benchmarks/object_size.py` (see its docstring). ID validation images (generator seed 1) '
             'split into thirds by the fraction of the image the object covers; average FPR95 (%) over the '
             f'validation OOD sets {", ".join(SETS)}; mean ± sd over {len(results)} runs '
             f'({", ".join(r["run"] for r in results)}).', '']
    for key, title in (('thirds', 'Thirds of all images'),
                       ('thirds_within_class', 'Thirds within each class (every third holds every class)')):
        def cell(t: int, k: str) -> str:
            return mean_sd([r[key][t]['fpr95'][k] for r in results])
        areas = [sum(r[key][t]['area_mean'] for r in results) / len(results) for t in range(3)]
        lines += [f'## {title}', '',
                  '| readout | ' + ' | '.join(f'objects {100 * a:.0f}% of the image (mean)' for a in areas) + ' |',
                  '|---|' + '---:|' * 3]
        lines += [f'| {label} | ' + ' | '.join(cell(t, k) for t in range(3)) + ' |' for k, label in READOUTS.items()]
        lines.append('')
    path.write_text('\n'.join(lines))


def _describe(r: dict) -> str:
    return '; '.join(f'{100 * t["area_mean"]:.0f}%: Eq.15 {t["fpr95"]["ssod"]:.1f}, top3 {t["fpr95"]["ssod_top3"]:.1f}'
                     for t in r['thirds_within_class'])


def main(argv: Optional[List[str]] = None) -> None:
    run_pairs(argv, __doc__, OUT, measure, write, _describe)


if __name__ == '__main__':
    main()
