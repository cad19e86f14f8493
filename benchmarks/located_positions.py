"""The OOD head as a locator: read the classifier where the OOD head finds the object.

SSOD's factorisation (paper Eq. 7) says where and what apart: the OOD head answers "is this an ID object?", the
classifier "which one?". The chosen readout, the mean MaxLogit of the 3 best positions
(``ssod_zoo.spatial_maxlogit_score``), uses the classifier for both: it picks the positions by the very score it
reports, so on an OOD image it always reads the classifier where it is most confident, wherever that is. Here the
OOD head picks the positions and the classifier is read there. On an ID image both should point at the object (the
OOD head separates object from background cells with patch AUROC 93.0, the study's probes); on a background-only
image the cells that look most like an object need not be the ones where some class's logit peaks, so the score
should fall more for OOD images than for ID ones. The paper reads its OOD head only on pooled features (Eq. 15);
this is beyond the paper.

Readouts, fixed before any of their numbers existed (eighteenth session), on seeds 0-2 of ``lrdecay-e16`` and their
CE twins, validation sets (near, textures, domain from generator seed 1, and Fashion-MNIST photographs):

- ``top3``: the chosen readout, on both models, checked against the study's records of the same runs;
- ``loc{K}`` for K in :data:`KS` (SSOD model only): the mean of max_i z_i(p) over the K positions p with the highest
  P_ID(p), the OOD head's per-position softmax on its ID output;
- ``pid_weighted`` (SSOD model only): sum_p P_ID(p) max_i z_i(p) / sum_p P_ID(p), every position weighted by how
  much the OOD head takes it for an ID object.

The CE twin has no OOD head, so it is scored on ``top3`` only, the reference for SSOD's paired gain.

Prediction, written and committed before any of these readouts was computed on any run:

1. no located readout meets the adoption rule below;
2. ``loc3`` lies within 2 points of ``top3`` on the SSOD model's average (3-seed means), either way: the study's
   closest readout that already mixes the two heads, the best-position posterior (max_p of logsumexp z(p) + log
   P_ID(p)), reads 23.6 against ``top3``'s 22.7 on these runs (the ``alpha`` grid's records);
3. ``loc3`` moves ``near`` by less than 2 points either way: on a held-out object the most object-like cells and the
   most class-like cells are the same cells, the object's;
4. ``pid_weighted`` is worse than ``loc3`` on average: it mixes in background cells, whose P_ID is small but not
   zero, and objects cover only 8-30% of the image;
5. ``loc9`` is worse than ``loc3`` on average: 9 of 36 cells is more than a small object covers.

Outcome (eighteenth session, after the run; ``results/located_positions/summary.md``): nothing is adopted, and
locating by the OOD head makes the readout worse. ``top3`` reads 22.77, ``loc1`` 31.0, ``loc3`` 26.2, ``loc9`` 23.8,
``pid_weighted`` 24.2 (3-seed means); the best, ``loc9``, is lower than ``top3`` in 1 of 3 seeds. Parts 1 and 3
held (``near`` 67.9 -> 68.3 for ``loc3``); parts 2, 4 and 5 failed: ``loc3`` is 3.4 points worse, and reading more
cells loses less (1, 3 and 9 cells: 31.0, 26.2, 23.8). The loss is on ``textures`` (16.5 -> 21.7) and ``domain``
(6.6 -> 14.4), the sets the locator was meant to help.

Why, measured after that outcome on the same runs (the records' ``mean`` field, SSOD model): ``agree``, the share of
images whose best position by P_ID is also their best by MaxLogit, and ``drop3``, ``top3`` minus ``loc3`` (how much
the score falls when the OOD head picks the positions), and ``confident``, how many of the 36 positions have
P_ID >= 0.9, per set, ID images included.

Adoption rule, fixed with the prediction (``study.rule_met``, the rule of ``odin_positions.py``): the located
readout with the lowest 3-seed mean validation average FPR95 on the SSOD model replaces ``top3`` only if that mean
is at least 2.0 points below ``top3``'s and lower in each of the 3 seeds. Then, and only then, ``--test`` scores it
once on the test sets over the headline's seeds 0-4; otherwise it refuses and no test number is computed.

Usage::

    python benchmarks/located_positions.py         # seeds 0-2 of lrdecay-e16 and their twins, validation sets
    python benchmarks/located_positions.py --runs lrdecay-e16-s0 \\
        --ce-runs ce-batch_size64-epochs16-lr0.0005-lr_step4-s0
    python benchmarks/located_positions.py --test  # only after validation adopted a readout
"""
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, mean_sd, save_figure  # noqa: E402
from study import (OUT as STUDY, adopted_readouts, check_against_record, check_lines, describe_pair,  # noqa: E402
                   pair_tables, rule_verdict, run_pairs, score_pair, headline_argv)

from ssod_zoo import spatial_maxlogit_score  # noqa: E402
from ssod_zoo.adapter import ID_INDEX  # noqa: E402

OUT = RESULTS / 'located_positions'
KS = (1, 3, 9)
FAMILIES = {'located': (*(f'loc{k}' for k in KS), 'pid_weighted')}
READOUTS = ('top3', *FAMILIES['located'])
MEANS = ('agree', 'drop3', 'confident')  # recorded as their mean per set, not scored as detectors
RUNS = [f'lrdecay-e16-s{s}' for s in (0, 1, 2)]
CE_RUNS = [f'ce-batch_size64-epochs16-lr0.0005-lr_step4-s{s}' for s in (0, 1, 2)]
# where the study recorded each recomputed reference: (model side, readout) -> the study's method name
STUDY_NAME = {('ssod', 'top3'): 'pos_top3_maxlogit', ('ce', 'top3'): 'ce_pos_top3_maxlogit'}


def located(cls: torch.Tensor, p_id: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) the mean of max_i z_i(p) over the ``k`` positions with the highest ``p_id`` (both (B, h*w) or maps)."""
    where = p_id.flatten(1).topk(min(k, p_id[0].numel()), dim=1).indices
    return cls.flatten(1).gather(1, where).mean(1)


@torch.no_grad()
def score_batch(model, x: torch.Tensor, ce: bool) -> Dict[str, torch.Tensor]:
    """(B,) scores of every readout of one batch, higher = more in-distribution."""
    s = model.forward_spatial(x)
    out = {'top3': spatial_maxlogit_score(s.cls_map, k=3)}
    if ce:
        return out
    best = s.cls_map.amax(1).flatten(1)  # (B, h*w): max_i z_i(p)
    p_id = s.ood_map.float().softmax(1)[:, ID_INDEX].flatten(1)
    out.update({f'loc{k}': located(best, p_id, k) for k in KS})
    out['pid_weighted'] = (p_id * best).sum(1) / p_id.sum(1)
    # the explanation's three quantities, not detectors (study.score_sets' ``means``)
    out['agree'] = (p_id.argmax(1) == best.argmax(1)).float()
    out['drop3'] = out['top3'] - out['loc3']
    out['confident'] = (p_id >= 0.9).sum(1).float()
    return out


def measure(run: str, ce_run: str, which: str = 'val', keep: Optional[List[str]] = None) -> dict:
    """One (SSOD run, CE twin) pair on the validation or test sets; ``keep``: the only readouts to record."""
    result = score_pair(run, ce_run, which, score_batch, keep, means=MEANS)
    grid, seed = 'alpha' if which == 'val' else 'test', run.rsplit('-s', 1)[1]
    result['reference_check'] = check_against_record(result, STUDY_NAME, STUDY / grid / f'lrdecay-e16-s{seed}.json')
    return result


def write(results: List[dict], path: Path) -> None:
    """The summary table at ``path`` and, on the validation sets, its plot beside it."""
    val = results[0]['sets'] == 'val'
    figure = path.with_suffix('.png')
    if val:
        plot(results, figure)
    sets = [s for s in results[0]['models']['ssod']['image']['top3'] if s != 'average']
    lines = ['# The OOD head as a locator: the classifier read where the OOD head finds the object', '',
             'Written by `python benchmarks/located_positions.py` (see its docstring: the readouts, the prediction '
             f'and the adoption rule). {"Validation" if val else "Test"} sets. FPR95 (%), mean ± sd over the runs '
             f'({", ".join(r["run"] for r in results)}; CE twins {", ".join(r["ce_run"] for r in results)}).', '',
             *([f'![FPR95 of each readout per set]({figure.name})', ''] if val else []),
             *pair_tables(results, sets, {side: list(results[0]['models'][side]['image']) for side in ('ssod', 'ce')},
                          ['top3'])]
    if val:
        lines += ['', '## The adoption rule (SSOD model)', '', *rule_verdict(results, FAMILIES)]
    if all('mean' in r['models']['ssod'] for r in results):
        names = ['id', *sets]
        lines += ['', '## Why (SSOD model; measured after the outcome)', '',
                  '`agree`: share of images (%) whose best position by P_ID is also their best by MaxLogit. `drop3`: '
                  '`top3` minus `loc3`, how far the score falls when the OOD head picks the positions (logits). '
                  '`confident`: how many of the 36 positions have P_ID >= 0.9. Mean ± sd over the runs.', '',
                  '| quantity | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
        for q, scale in (('agree', 100), ('drop3', 1), ('confident', 1)):
            lines.append(f'| {q} | ' + ' | '.join(
                mean_sd([scale * r['models']['ssod']['mean'][q][n] for r in results]) for n in names) + ' |')
    path.write_text('\n'.join([*lines, *check_lines(results)]) + '\n')


def plot(results: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sets = [*[s for s in results[0]['models']['ssod']['image']['top3'] if s != 'average'], 'average']
    rows = [('ssod', r) for r in READOUTS] + [('ce', 'top3')]
    fig, axes = plt.subplots(1, len(sets), figsize=(2.6 * len(sets), 3.2), squeeze=False)
    for ax, s in zip(axes[0], sets):
        vals = torch.tensor([[r['models'][side]['image'][name][s]['fpr95'] for side, name in rows] for r in results])
        ax.bar(range(len(rows)), vals.mean(0).tolist(), yerr=vals.std(0).tolist() if len(results) > 1 else None,
               capsize=2, color=['C0'] + ['C2'] * len(FAMILIES['located']) + ['C1'])
        ax.set_xticks(range(len(rows)), [n if side == 'ssod' else 'top3 (CE)' for side, n in rows], fontsize=7,
                      rotation=45)
        ax.set_title(s, fontsize=9)
    axes[0][0].set_ylabel('FPR95 (%)')
    fig.suptitle(f'The chosen readout (blue), located by the OOD head (green), the CE twin (orange); '
                 f'{len(results)} runs, {results[0]["sets"]} sets', fontsize=9)
    save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(argv or [])
    if '--test' in argv:
        argv.remove('--test')
        chosen = adopted_readouts(OUT, RUNS, FAMILIES)
        if not chosen:
            raise SystemExit(f'--test scores the test sets only for a readout that met the adoption rule on the '
                             f'validation sets; the records under {OUT} hold none (run without --test first)')
        run_pairs(headline_argv(argv), __doc__, OUT / 'test', lambda r, c: measure(r, c, 'test', ['top3', *chosen]),
                  write, describe_pair)
        return
    run_pairs(argv or ['--runs', *RUNS, '--ce-runs', *CE_RUNS], __doc__, OUT, measure, write, describe_pair)


if __name__ == '__main__':
    main(sys.argv[1:])
