"""Can the readout that detects best keep what SSOD training adds? The 3 best positions plus the pooled Energy.

The study's paired table (``study.py``, ``summary.md``) found SSOD training improving its model's own pooled
Energy, log sum_i exp(z_i) of the pooled logits, over its cross-entropy twin's in 23 of 25 runs (+2.77 FPR95 on
average, as the table stood when this was written), but the readout that detects best, the mean MaxLogit of the 3
best feature-map positions, by only +0.91. The pooled score is strongest on ``near`` (a held-out object in the same
scenes), the position readout on ``textures`` and ``domain`` (no ID object). This asks whether one score gets both, and whether SSOD's gain on the
pooled part survives in it. Two readouts, fixed before any of their numbers existed (ninth session):

- ``fused``: top3(x) + E(x), the mean MaxLogit of the 3 best positions plus the pooled Energy. Both are in logit
  units (the classifier is linear, so the pooled logits are the mean of the position logits), so the sum has no
  fitted weight. A classifier-only readout: scored on the CE twin too.
- ``fused_pid``: fused + log P_ID(x), the pooled OOD factor of Eq. 15 added as in ``posterior_score``: does the
  OOD head add anything to a strong readout? SSOD model only.

Prediction, written before the run: on the validation sets, ``fused`` is better than the 3 best positions on
``near`` and worse on ``textures`` and ``domain``, and its average is within 2 points of the 3 best positions';
SSOD's paired gain over its twin on ``fused`` lies between its gains on the two parts; ``fused_pid`` is no better
than ``fused``. Validation sets only, every 10-class study run whose checkpoints are in the cache: this is a
diagnostic, not a candidate of the selection rule. The parts (the 3 best positions and the pooled Energy) are
recomputed and checked against the study's records of the same runs.

Tenth session: the study's ``alpha`` grid (alpha 0.3, 1, 3 and 10 on lrdecay-e16's recipe, 3 seeds) found that
SSOD's gain on the pooled Energy grows with the OOD loss's weight (+1.35, +5.03, +5.75, +7.20 over the twin) while
its gain on the 3 best positions does not (+1.13, +2.17, +2.40, +1.57). Does the fused score carry the pooled gain
into a readout that detects well? Prediction, written before its runs: (1) SSOD's paired gain on ``fused`` orders
alpha 0.3 < 1 < 10 (3-seed means), and at alpha 10 it is larger than its gain on the 3 best positions; (2) at alpha
10, ``fused`` on the SSOD model beats its 3 best positions (23.27); (3) no readout here reaches the goal on
validation: the best 3-seed mean of ``top3`` and ``fused`` over the four weights stays above 21.62, ODIN's 31.62
less 10.

Usage::

    python benchmarks/fused_readout.py   # every cached 10-class run of the study, scored on the validation sets
    python benchmarks/fused_readout.py --runs lrdecay-e16-s0 --ce-runs ce-batch_size64-epochs16-lr0.0005-lr_step4-s0
    python benchmarks/fused_readout.py --grid alpha   # the runs of one study grid: summary_alpha.md
"""
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, mean_sd  # noqa: E402
from study import CACHE, CONFIGS, DEVICE, OUT as STUDY, benchmarks, eval_sets, run_pairs  # noqa: E402

from ssod_zoo.app import train as train_mod  # noqa: E402
from ssod_zoo.hub import load_checkpoint  # noqa: E402
from ssod_zoo.metrics import ood_metrics  # noqa: E402
from ssod_zoo.output import spatial_maxlogit_score  # noqa: E402

OUT = RESULTS / 'fused_readout'
READOUTS = ('top3', 'energy', 'fused', 'fused_pid')
# the study's names of the parts, to check the recomputation against its records
STUDY_NAMES = {('ssod', 'top3'): 'pos_top3_maxlogit', ('ssod', 'energy'): 'ssod_energy',
               ('ce', 'top3'): 'ce_pos_top3_maxlogit', ('ce', 'energy'): 'energy'}


@torch.no_grad()
def scores(model, loader: DataLoader) -> Dict[str, torch.Tensor]:
    out = {m: [] for m in READOUTS}
    for x, _ in loader:
        s = model.forward_spatial(x.to(DEVICE))
        top3 = spatial_maxlogit_score(s.cls_map, k=3)
        energy = s.logits.float().logsumexp(dim=1)
        log_pid = s.ood_logits.float().log_softmax(dim=1)[:, 1]  # index 1: in-distribution (adapter.ID_INDEX)
        for m, v in zip(READOUTS, (top3, energy, top3 + energy, top3 + energy + log_pid)):
            out[m].append(v.cpu())
    return {m: torch.cat(v) for m, v in out.items()}


def study_record(run: str) -> Optional[dict]:
    """The study's validation record of ``run`` (``name-sN``), from any grid folder."""
    for path in sorted(STUDY.glob(f'*/{run}.json')):
        r = json.loads(path.read_text())
        if r['sets'] == 'val':
            return r
    return None


def measure(run: str, ce_run: str) -> dict:
    benches = benchmarks()
    ssod, ckpt = load_checkpoint(CACHE / 'runs' / run / 'last.pt')
    ce, _ = load_checkpoint(CACHE / 'runs' / ce_run / 'last.pt')
    ssod.to(DEVICE).eval(), ce.to(DEVICE).eval()
    tf = train_mod._transforms(ssod, train_mod.TrainConfig(img_size=ckpt['config']['img_size'], crop_pct=1.0))[1]
    sets = eval_sets(benches, 'val', tf)
    loaders = {k: DataLoader(v, batch_size=128, num_workers=2) for k, v in sets.items()}
    per_model = {name: {k: scores(m, ld) for k, ld in loaders.items()} for name, m in (('ssod', ssod), ('ce', ce))}
    ood_sets = [k for k in loaders if k != 'id']
    out = {'run': run, 'ce_run': ce_run, 'sets': ood_sets, 'fpr95': {}, 'auroc': {}, 'check': {}}
    for name, by_set in per_model.items():
        readouts = READOUTS if name == 'ssod' else READOUTS[:3]  # the CE twin has no trained OOD head
        for key in ('fpr95', 'auroc'):
            out[key][name] = {m: {} for m in readouts}
        for m in readouts:
            for s in ood_sets:
                met = ood_metrics(by_set['id'][m], by_set[s][m])
                out['fpr95'][name][m][s] = 100 * float(met['fpr95'])
                out['auroc'][name][m][s] = 100 * float(met['auroc'])
            for key in ('fpr95', 'auroc'):
                out[key][name][m]['average'] = sum(out[key][name][m][s] for s in ood_sets) / len(ood_sets)
    record = study_record(run)
    if record:  # the parts, recomputed, against the study's own numbers for the same checkpoints
        out['check'] = {f'{name}/{m}': round(abs(out['fpr95'][name][m]['average']
                                                 - record['ood']['average'][study]['fpr95']), 4)
                        for (name, m), study in STUDY_NAMES.items()}
    return out


def write(results: List[dict], path: Path) -> None:
    sets = results[0]['sets']
    rows = [('ssod', m) for m in READOUTS] + [('ce', m) for m in READOUTS[:3]]
    label = {'ssod': 'SSOD', 'ce': 'CE twin'}
    lines = ['# The 3 best positions plus the pooled Energy (validation)', '',
             'Written by `python benchmarks/fused_readout.py` (see its docstring for the readouts and the prediction '
             f'written before the run). FPR95 (%) on the validation OOD sets, mean ± sd over {len(results)} runs '
             '(each an SSOD run and its CE twin of the study).', '',
             f'| readout | model | {" | ".join(sets)} | average FPR95↓ | average AUROC↑ |',
             '|---|---|' + '---:|' * (len(sets) + 2)]
    for name, m in rows:
        cells = [mean_sd([r['fpr95'][name][m][s] for r in results]) for s in (*sets, 'average')]
        lines.append(f'| {m} | {label[name]} | {" | ".join(cells)} | '
                     f'{mean_sd([r["auroc"][name][m]["average"] for r in results])} |')
    lines += ['', '**SSOD against its twin, paired** (twin minus SSOD, average FPR95; positive: SSOD training '
              'helped). The `--ood-detach` runs apart, as in the study: their classifier gets no OOD gradient.', '',
              '| readout | runs | mean | SSOD better in | range |', '|---|---|---:|---:|---|']
    for detach in (False, True):
        group = [r for r in results if bool(CONFIGS[_config(r)].get('ood_detach')) == detach]
        for m in READOUTS[:3] if group else ():
            gaps = [r['fpr95']['ce'][m]['average'] - r['fpr95']['ssod'][m]['average'] for r in group]
            lines.append(f'| {m} | {"--ood-detach (control)" if detach else "SSOD"} | {sum(gaps) / len(gaps):+.2f} | '
                         f'{sum(g > 0 for g in gaps)} of {len(gaps)} | {min(gaps):+.2f} to {max(gaps):+.2f} |')
    lines += ['', '**Within the SSOD model** (the 3 best positions minus the other readout, average FPR95; '
              'positive: the other readout is better):', '', '| readout | mean | better in | range |',
              '|---|---:|---:|---|']
    for m in ('fused', 'fused_pid'):
        gaps = [r['fpr95']['ssod']['top3']['average'] - r['fpr95']['ssod'][m]['average'] for r in results]
        lines.append(f'| {m} | {sum(gaps) / len(gaps):+.2f} | {sum(g > 0 for g in gaps)} of {len(gaps)} | '
                     f'{min(gaps):+.2f} to {max(gaps):+.2f} |')
    configs = sorted({_config(r) for r in results})
    if len(configs) < len(results):  # several seeds of a config: its means
        lines += ['', '**Per config** (mean over its runs, average FPR95; gain: twin minus SSOD):', '',
                  '| config | runs | top3, SSOD | fused, SSOD | fused, CE twin | gain on top3 | gain on energy | '
                  'gain on fused |', '|---|---:|---:|---:|---:|---:|---:|---:|']
        for c in configs:
            rs = [r for r in results if _config(r) == c]
            avg = {(name, m): sum(r['fpr95'][name][m]['average'] for r in rs) / len(rs) for name in ('ssod', 'ce')
                   for m in READOUTS[:3]}
            lines.append(f'| {c} | {len(rs)} | {avg["ssod", "top3"]:.2f} | {avg["ssod", "fused"]:.2f} | '
                         f'{avg["ce", "fused"]:.2f} | ' + ' | '.join(
                             f'{avg["ce", m] - avg["ssod", m]:+.2f}' for m in ('top3', 'energy', 'fused')) + ' |')
    checks = [v for r in results for v in r['check'].values()]
    lines += ['', f'The parts recomputed here against the study\'s records of the same checkpoints: {len(checks)} '
              f'averages, largest difference {max(checks, default=float("nan")):.4f} FPR95 points.', '',
              'Per run (average FPR95; SSOD top3 / energy / fused / fused_pid, then CE twin top3 / energy / '
              'fused):', '']
    for r in results:
        f = r['fpr95']
        lines.append(f'- `{r["run"]}`: ' + ' / '.join(f'{f["ssod"][m]["average"]:.2f}' for m in READOUTS) + '; '
                     + ' / '.join(f'{f["ce"][m]["average"]:.2f}' for m in READOUTS[:3]))
    path.write_text('\n'.join(lines) + '\n')


def _config(r: dict) -> str:
    return r['run'].rsplit('-s', 1)[0]  # the study's config name: the run less its seed


def _describe(r: dict) -> str:
    f = r['fpr95']
    return ', '.join(f'{m} {f["ssod"][m]["average"]:.1f}' + (f'/{f["ce"][m]["average"]:.1f}' if m in f['ce'] else '')
                     for m in READOUTS)


def all_pairs(grid: str = '*') -> List[str]:
    """``--runs ... --ce-runs ...`` for every 10-class run of the study (or of its ``grid``) whose checkpoints are
    cached (those of the ``test`` grid too: here they are scored on the validation sets)."""
    runs, ce_runs = [], []
    for path in sorted(STUDY.glob(f'{grid}/*.json')):
        if path.name == 'choice.json':
            continue
        r = json.loads(path.read_text())
        run, ce_run = f'{r["name"]}-s{r["seed"]}', f'{r["ce_twin"]}-s{r["seed"]}'
        if (CONFIGS[r['name']].get('classes', 10) != 10 or run in runs
                or not all((CACHE / 'runs' / n / 'last.pt').exists() for n in (run, ce_run))):
            continue
        runs.append(run)
        ce_runs.append(ce_run)
    return ['--runs', *runs, '--ce-runs', *ce_runs] if runs else []  # none cached: run_pairs says what to train


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--grid' in argv:  # --grid NAME: that grid's runs, into summary_NAME.md
        i = argv.index('--grid')
        grid = argv[i + 1] if i + 1 < len(argv) else ''
        if not (STUDY / grid).is_dir() or not grid:
            raise SystemExit(f'--grid wants a study grid with records, one of: '
                             f'{", ".join(sorted(p.name for p in STUDY.iterdir() if p.is_dir()))}')
        argv = all_pairs(grid) + ['--summary', f'summary_{grid}.md'] + argv[:i] + argv[i + 2:]
    run_pairs(argv if '--runs' in argv else all_pairs() + argv, __doc__, OUT, measure, write, _describe)


if __name__ == '__main__':
    main()
