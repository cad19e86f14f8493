"""Is SSOD's objective a better training regulariser for post-hoc scores? The 8 baselines on both models.

The study scores the 8 post-hoc baselines (MSP, MaxLogit, Energy, ODIN, ReAct, KNN, Mahalanobis, ViM) on the
cross-entropy twin only, as the issue's goal defines them. Here each of them is also scored on the SSOD model
itself (its classifier and features; the OOD head unused), on the study's *validation* sets, fitted on the same
training images. If SSOD training helps post-hoc scores, the SSOD column wins.

Usage::

    python benchmarks/posthoc_on_ssod.py   # the three lrdecay-e16 runs and their CE twins
"""
import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, mean_sd  # noqa: E402
from study import CACHE, benchmarks, eval_sets, run_pairs  # noqa: E402

from ssod_zoo.app import train as train_mod  # noqa: E402
from ssod_zoo.app.evaluate import evaluate  # noqa: E402
from ssod_zoo.hub import load_checkpoint  # noqa: E402

OUT = RESULTS / 'posthoc_on_ssod'
BASELINES = ('msp', 'maxlogit', 'energy', 'odin', 'react', 'knn', 'mahalanobis', 'vim')


def measure(run: str, ce_run: str) -> dict:
    benches = benchmarks()
    ssod, ckpt = load_checkpoint(CACHE / 'runs' / run / 'last.pt')
    ce, _ = load_checkpoint(CACHE / 'runs' / ce_run / 'last.pt')
    tf = train_mod._transforms(ssod, train_mod.TrainConfig(img_size=ckpt['config']['img_size'], crop_pct=1.0))[1]
    loader = lambda ds: DataLoader(ds, batch_size=128, num_workers=2)  # noqa: E731
    sets = {k: loader(v) for k, v in eval_sets(benches, 'val', tf).items()}
    fit = loader(benches['test'].train_dataset(tf))
    out = {'run': run, 'ce_run': ce_run, 'fpr95': {}, 'auroc': {}}
    for name, model in (('ssod', ssod), ('ce', ce)):
        res = evaluate(ssod, sets['id'], {k: v for k, v in sets.items() if k != 'id'}, baseline_model=model,
                       fit_loader=fit, methods=BASELINES, progress=False, odin_pixel_units=False)  # the study's ODIN
        out['fpr95'][name] = {m: res['ood']['average'][m]['fpr95'] for m in BASELINES}
        out['auroc'][name] = {m: res['ood']['average'][m]['auroc'] for m in BASELINES}
        out[f'per_set_fpr95_{name}'] = {s: {m: r[m]['fpr95'] for m in BASELINES}
                                        for s, r in res['ood'].items() if s != 'average'}
    return out


def write(results: List[dict], path: Path) -> None:
    def stat(model: str, m: str) -> str:
        return mean_sd([r['fpr95'][model][m] for r in results])

    def diff(m: str) -> str:
        v = torch.tensor([r['fpr95']['ce'][m] - r['fpr95']['ssod'][m] for r in results], dtype=torch.float64)
        return f'{v.mean():+.1f}' + (f' (runs: {", ".join(f"{x:+.1f}" for x in v.tolist())})' if len(v) > 1 else '')

    sets = list(results[0]['per_set_fpr95_ssod'])
    lines = ['# The 8 post-hoc baselines on the SSOD model and on its CE twin (validation)', '',
             'Written by `python benchmarks/posthoc_on_ssod.py` (see its docstring). Average FPR95 (%) over the '
             f'validation OOD sets ({", ".join(sets)}), mean ± sd over {len(results)} runs '
             f'({", ".join(r["run"] for r in results)}); the last column is CE minus SSOD (positive: the SSOD '
             "model's classifier and features detect better).", '',
             '| baseline | on the SSOD model | on the CE twin | CE - SSOD |', '|---|---:|---:|---:|']
    lines += [f'| {m} | {stat("ssod", m)} | {stat("ce", m)} | {diff(m)} |' for m in BASELINES]
    path.write_text('\n'.join(lines) + '\n')


def _describe(r: dict) -> str:
    return ', '.join(f'{m} {r["fpr95"]["ssod"][m]:.1f}/{r["fpr95"]["ce"][m]:.1f}' for m in BASELINES)


def main(argv: Optional[List[str]] = None) -> None:
    run_pairs(argv, __doc__, OUT, measure, write, _describe)


if __name__ == '__main__':
    main()
