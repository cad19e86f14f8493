"""ODIN's two parts, the input step and the temperature, on the chosen readout: the 3 best positions.

ODIN (Liang et al. 2018) is the best of the 8 pooled post-hoc baselines in every seed of the study. It has two parts:
a temperature (T = 1000) on the softmax, and one signed-gradient step on the input that raises the score, which
raises ID images' scores more than OOD images'. The chosen readout, the mean MaxLogit of the 3 best feature-map
positions (``ssod_zoo.spatial_maxlogit_score``), has no softmax, so only the input step applies. This asks whether
that step lowers the readout's FPR95 on the SSOD model, and whether it does so more there than on the CE twin.

Readouts, fixed before any of their numbers existed (seventeenth session), on seeds 0-2 of ``lrdecay-e16`` and
their CE twins, validation sets (near, textures, domain from generator seed 1, and Fashion-MNIST photographs):

- ``top3``: the chosen readout, unperturbed, checked against the study's records of the same runs;
- ``top3_eps{E}`` for E in :data:`EPSILONS`: the same readout of x~ = x + E * sign(grad_x top3(x)), one step in
  the space of normalised inputs (the convention of ``ssod_zoo.scores.odin``, whose step is 0.0014);
- on the CE twin only, as references for where ODIN's lead comes from: ``odin`` (T = 1000, step 0.0014, the study's
  baseline, checked against its records) and ``odin_eps0`` (T = 1000 alone, no input step).

Prediction, written and committed before any of these readouts was computed on any run:

1. no step size meets the adoption rule below;
2. on the SSOD model the best step size lowers ``near`` by less than 3 points (3-seed means): ``near`` is 68 of
   the readout's 22.7 average, and its held-out shapes respond to a step towards "more like a class" as the ID
   objects do;
3. SSOD's paired gain over its twin changes by less than 1 point between ``top3`` and the best step size: the step
   is a post-hoc device and acts on both models alike;
4. the largest step, 0.008, is worse than no step on the SSOD model's average;
5. most of ODIN's lead over the pooled MSP on the CE twin comes from the temperature: ``odin_eps0`` is closer to
   ``odin`` than to MSP (MSP from the study's records).

Outcome (seventeenth session, after the run; ``results/odin_positions/summary.md``): all five parts held. No step
helps: on both models every step size makes the readout worse than no step in every seed, and the larger the step,
the worse on the 3-seed means (SSOD 22.77 unperturbed, 22.88 at 0.0005, 24.93 at 0.008; the twin 24.83 to 26.53).
``near`` moves by +0.1 at the smallest step and +2.2 at the largest. SSOD's paired gain stays +2.07 at the smallest
step and falls to +1.60 at the largest. On the CE twin ODIN's lead over MSP is all temperature: ``odin_eps0`` 31.2
and ``odin`` 31.6 against MSP's 48.7 (the study's records of these seeds), so the input step costs ODIN 0.4 here as
well. The models were rebuilt on an Intel Xeon from records made on an AMD EPYC; the references agree within one to
three images per set (the summary's checks).

Adoption rule, fixed with the prediction: the step size with the lowest 3-seed mean validation average FPR95 on the
SSOD model replaces the unperturbed readout only if that mean is at least 2.0 points below ``top3``'s and lower in
each of the 3 seeds. Then, and only then, ``--test`` scores it once on the test sets over the headline's seeds 0-4;
otherwise it refuses and no test number is computed.

**The temperature** (added in the same session, after the outcome above, which found ODIN's lead to be its
temperature alone). With large T, max_i softmax(z / T)_i ranks images nearly as max_i z_i - mean_i z_i does, not as
max_i z_i: it discounts logits that are high for every class, as on ``textures`` and ``domain``, where pooled ODIN
leads pooled MaxLogit by 8-21 points in the study's records of these seeds (``near``: no lead). Readouts, fixed
before any of their numbers existed:

- ``top3_msp_T{T}`` for T in :data:`TEMPERATURES`: the mean over the 3 best positions of the per-position
  max_i softmax(z(p) / T)_i, the positions chosen by that score (as ``top3`` chooses by MaxLogit); no input step.

Prediction, committed before any of these readouts was computed on any run:

6. no temperature meets the adoption rule (the same rule, over :data:`TEMPERATURES` instead of the step sizes);
7. on the SSOD model T = 1000 lowers ``textures`` and ``domain`` below ``top3`` (3-seed means) and moves ``near`` by
   less than 1.5 points either way;
8. T = 1 (per-position MSP) is worse than ``top3`` on the SSOD model's average, as the pooled MSP is worse than the
   pooled MaxLogit in the study's records of these seeds (48.7 against 41.0);
9. SSOD's paired gain over its twin at the best temperature lies within 1 point of its gain on ``top3``.

Outcome (seventeenth session, after the run; ``results/odin_positions/summary.md``): all four parts held. The
temperature helps, in every seed, by less than the rule asks: T = 1000 reads 21.58 against ``top3``'s 22.77 (by
0.30, 0.55 and 2.70 per seed), T = 10 21.67. Not adopted; no test number. It lowers ``textures`` (16.5 -> 13.6) and
``domain`` (6.6 -> 5.0) and leaves ``near`` (67.9 -> 67.7). T = 1 does the opposite: ``near`` 65.1, the best of any
readout here, but ``textures`` 22.3 and ``domain`` 10.1, 24.4 on average. SSOD's paired gain is +2.37 at T = 1000
(+2.07 on ``top3``) and +0.13 at T = 1.

Usage::

    python benchmarks/odin_positions.py         # seeds 0-2 of lrdecay-e16 and their twins, validation sets
    python benchmarks/odin_positions.py --runs lrdecay-e16-s0 \
        --ce-runs ce-batch_size64-epochs16-lr0.0005-lr_step4-s0
"""
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, save_figure  # noqa: E402
from study import (OUT as STUDY, adopted_readouts, check_against_record, check_lines, describe_pair,  # noqa: E402
                   pair_tables, rule_best, rule_verdict, run_pairs, score_pair, headline_argv)

from ssod_zoo import spatial_maxlogit_score  # noqa: E402
from ssod_zoo.app.evaluate import _logits_fn  # noqa: E402
from ssod_zoo.scores import odin  # noqa: E402

OUT = RESULTS / 'odin_positions'
EPSILONS = (0.0005, 0.001, 0.002, 0.004, 0.008)
TEMPERATURES = (1, 10, 1000)
FAMILIES = {'step': tuple(f'top3_eps{e:g}' for e in EPSILONS),
            'temperature': tuple(f'top3_msp_T{t}' for t in TEMPERATURES)}
AXIS = {'step': ('input step', EPSILONS), 'temperature': ('temperature T', TEMPERATURES)}
READOUTS = ('top3', *FAMILIES['step'], *FAMILIES['temperature'])
SEEDS = (0, 1, 2)
RUNS = [f'lrdecay-e16-s{s}' for s in SEEDS]
CE_RUNS = [f'ce-batch_size64-epochs16-lr0.0005-lr_step4-s{s}' for s in SEEDS]
# where the study recorded each recomputed reference: (model side, readout) -> the study's method name
STUDY_NAME = {('ssod', 'top3'): 'pos_top3_maxlogit', ('ce', 'top3'): 'ce_pos_top3_maxlogit', ('ce', 'odin'): 'odin'}


def cls_map(model, x: torch.Tensor) -> torch.Tensor:
    """(B, M, h, w): the classifier at every position, differentiable with respect to ``x``."""
    return model.forward_positions(model.forward_features(x))[0]


def tempered_top3(cls: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) the mean of the 3 largest per-position max_i softmax(z(p) / T)_i (in float64: at T = 1000 the
    probabilities differ from 1 / M in the fourth digit)."""
    p = (cls.double() / temperature).softmax(1).amax(1).flatten(1)
    return p.topk(min(3, p.shape[1]), dim=1).values.mean(1)


def score_batch(model, x: torch.Tensor, ce: bool) -> Dict[str, torch.Tensor]:
    """(B,) scores of every readout of one batch, higher = more in-distribution."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        cls = cls_map(model, x)
        s = spatial_maxlogit_score(cls, k=3)
        step = torch.autograd.grad(s.sum(), x)[0].sign()
    out = {'top3': s.detach()}
    with torch.no_grad():
        for e in EPSILONS:
            out[f'top3_eps{e:g}'] = spatial_maxlogit_score(cls_map(model, x.detach() + e * step), k=3)
        for t in TEMPERATURES:
            out[f'top3_msp_T{t}'] = tempered_top3(cls.detach(), t)
    if ce:
        logits = _logits_fn(model)  # what `ssod eval` and the study give ODIN
        out['odin'] = odin(logits, x.detach())
        out['odin_eps0'] = odin(logits, x.detach(), epsilon=0.0)
    return out


def measure(run: str, ce_run: str, which: str = 'val', keep: Optional[List[str]] = None) -> dict:
    """One (SSOD run, CE twin) pair on the validation or test sets; ``keep``: the only readouts to record."""
    result = {**score_pair(run, ce_run, which, score_batch, keep), 'epsilons': list(EPSILONS)}
    result['reference_check'] = _check(result)
    return result


def _check(result: dict) -> str:
    """The recomputed references against the study's record of the same run on the same sets."""
    grid, seed = 'alpha' if result['sets'] == 'val' else 'test', result['run'].rsplit('-s', 1)[1]
    return check_against_record(result, STUDY_NAME, STUDY / grid / f'lrdecay-e16-s{seed}.json')


def best_of(results: List[dict], family: str) -> tuple:
    """(readout, 3-seed mean, per-seed averages) of the family's readout with the lowest mean on the SSOD model."""
    return rule_best(results, FAMILIES[family])


def held(results: List[dict]) -> List[str]:
    """The families these results hold (records made before the temperature family hold only the step)."""
    return [f for f in FAMILIES if all(r in results[0]['models']['ssod']['image'] for r in FAMILIES[f])]


def verdict(results: List[dict]) -> List[str]:
    """One line per family: its best readout against ``top3`` and whether it meets the adoption rule."""
    return rule_verdict(results, {f: FAMILIES[f] for f in held(results)})


def write(results: List[dict], path: Path) -> None:
    """The summary table at ``path`` and its plot beside it."""
    figure = path.with_suffix('.png')
    if held(results):  # the test sets' records hold only the chosen readouts: no curve to draw
        plot(results, figure)
    sets = [s for s in results[0]['models']['ssod']['image']['top3'] if s != 'average']
    names = [r for r in READOUTS if r in results[0]['models']['ssod']['image']]
    lines = ['# ODIN\'s input step and temperature on the 3 best positions', '',
             'Written by `python benchmarks/odin_positions.py` (see its docstring: the readouts, the predictions and '
             f'the adoption rule). {"Validation" if results[0]["sets"] == "val" else "Test"} sets. FPR95 (%), '
             f'mean ± sd over the runs ({", ".join(r["run"] for r in results)}; CE twins '
             f'{", ".join(r["ce_run"] for r in results)}).', '',
             *([f'![FPR95 against the step size and the temperature]({figure.name})', ''] if held(results) else []),
             *pair_tables(results, sets, {side: list(results[0]['models'][side]['image']) for side in ('ssod', 'ce')},
                          names)]
    if results[0]['sets'] == 'val':
        lines += ['', '## The adoption rule (SSOD model)', '', *verdict(results)]
    path.write_text('\n'.join([*lines, *check_lines(results)]) + '\n')


def plot(results: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sets = [*[s for s in results[0]['models']['ssod']['image']['top3'] if s != 'average'], 'average']
    families = held(results)
    fig, axes = plt.subplots(len(families), len(sets), figsize=(2.6 * len(sets), 3.0 * len(families)),
                             squeeze=False)
    for row, family in zip(axes, families):
        label, values = AXIS[family]
        names = ['top3', *FAMILIES[family]]
        for ax, s in zip(row, sets):
            for side, style in (('ssod', '-'), ('ce', '--')):
                vals = torch.tensor([[r['models'][side]['image'][name][s]['fpr95'] for name in names]
                                     for r in results])
                ax.errorbar(range(len(names)), vals.mean(0).tolist(),
                            yerr=vals.std(0).tolist() if len(results) > 1 else None, fmt='o' + style, ms=3,
                            capsize=2, color='C0' if side == 'ssod' else 'C1',
                            label='SSOD' if side == 'ssod' else 'CE twin')
            # evenly spaced: the chosen readout (MaxLogit, no step), then each value of the family
            ax.set_xticks(range(len(names)), ['top3', *(f'{v:g}' for v in values)], fontsize=7, rotation=45)
            ax.set_title(s, fontsize=9)
            ax.set_xlabel(label, fontsize=8)
        row[0].set_ylabel('FPR95 (%), 3 best positions')
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f'ODIN\'s input step and temperature on the chosen readout ({len(results)} runs, '
                 f'{results[0]["sets"]} sets)', fontsize=9)
    save_figure(fig, path)


def chosen_readouts() -> List[str]:
    """The best readout of each family that met the adoption rule on the validation records of :data:`RUNS`."""
    return adopted_readouts(OUT, RUNS, FAMILIES)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(argv or [])
    if '--test' in argv:
        argv.remove('--test')
        chosen = chosen_readouts()
        if not chosen:
            raise SystemExit(f'--test scores the test sets only for a readout that met the adoption rule on the '
                             f'validation sets; the records under {OUT} hold none (run without --test first)')
        keep = ['top3', *chosen, 'odin']
        run_pairs(headline_argv(argv), __doc__, OUT / 'test', lambda r, c: measure(r, c, 'test', keep), write,
                  describe_pair)
        return
    run_pairs(argv or ['--runs', *RUNS, '--ce-runs', *CE_RUNS], __doc__, OUT, measure, write, describe_pair)


if __name__ == '__main__':
    main(sys.argv[1:])
