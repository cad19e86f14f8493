"""How far SSOD training moves the backbone away from cross-entropy training: weight distances of the study's runs.

The ``--ood-detach`` ablation (``study.py --grid ablate``) asks whether SSOD's effects come from the OOD loss's
gradient into the backbone. Its premise can be checked on the weights alone: with the gradient cut, the backbone
sees the same loss as the CE twin (same init, data order and seed), so it should end where the twin ends, and
with it, it should end measurably elsewhere. For each (SSOD run, CE twin) pair this measures, per backbone stage
and over the whole backbone (learned parameters; classifier, OOD head and BatchNorm running statistics left
out), the relative distances

- ``ssod~ce``: ||w_ssod - w_ce|| / ||w_ce - w_init||, the SSOD backbone's distance from the twin's, in units of how
  far the twin itself moved in training (0: the same weights; 1: as far apart as training moves them);
- ``ssod~init`` and ``ce~init``: ||w - w_init|| / ||w_init||, how far each moved from the shipped init.

A CE run given as ``--runs`` against another seed's CE run as ``--ce-runs`` gives the scale of seed-to-seed
differences (other data order and augmentation), against which ``ssod~ce`` is read. No image is read: the figures
come from the checkpoints in the study cache.

Usage::

    CE=ce-batch_size64-epochs8-lr0.0005
    python benchmarks/weight_drift.py --runs {paper,detach}-e8-s{0,1,2} $CE-s1 $CE-s2 \\
        --ce-runs $CE-s{0,1,2} $CE-s{0,1,2} $CE-s0 $CE-s1
"""
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, mean_sd  # noqa: E402
from study import CACHE, run_pairs  # noqa: E402

from ssod_zoo.app.demo import SHIPPED_INIT  # noqa: E402
from ssod_zoo.hub import load_checkpoint  # noqa: E402

OUT = RESULTS / 'weight_drift'
WHOLE = 'backbone'


def backbone(model) -> Dict[str, torch.Tensor]:
    """The learned parameters outside the classifier and the OOD head, by name. BatchNorm's running statistics are
    left out: they are buffers, larger in norm than the weights, and would dominate every distance."""
    heads = (model.pretrained_cfg['classifier'] + '.', 'ood_head.')
    return {k: v.detach().double() for k, v in model.named_parameters() if not k.startswith(heads)}


def group(name: str) -> str:
    return name.split('.')[0]


def norms(delta: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """L2 norm of a weight difference per top-level module, and over the whole backbone."""
    sq: Dict[str, float] = {}
    for k, v in delta.items():
        sq[group(k)] = sq.get(group(k), 0.0) + float(v.pow(2).sum())
    sq[WHOLE] = sum(sq.values())
    return {k: v ** 0.5 for k, v in sq.items()}


def measure(run: str, ce_run: str) -> dict:
    ssod, ckpt = load_checkpoint(CACHE / 'runs' / run / 'last.pt')
    ce, ce_ckpt = load_checkpoint(CACHE / 'runs' / ce_run / 'last.pt')
    w_ssod, w_ce = backbone(ssod), backbone(ce)
    for name, config in ((run, ckpt['config']), (ce_run, ce_ckpt['config'])):
        init_path = config.get('init')
        if not init_path or Path(init_path).name != SHIPPED_INIT.name:  # the path where the run was trained
            raise SystemExit(f'{name} does not start from {SHIPPED_INIT.name} (its init: {init_path!r}): no shared '
                             'init to measure distances from')
    init = load_file(SHIPPED_INIT)
    w_init = {k: init[k].double() for k in w_ce}
    ce_moved = norms({k: w_ce[k] - w_init[k] for k in w_ce})
    ssod_moved = norms({k: w_ssod[k] - w_init[k] for k in w_ce})
    apart, size = norms({k: w_ssod[k] - w_ce[k] for k in w_ce}), norms(w_init)
    return {'run': run, 'ce_run': ce_run, 'ood_detach': bool(ckpt['config'].get('ood_detach')),
            'init': SHIPPED_INIT.name,
            'groups': {g: {'ssod~ce': apart[g] / ce_moved[g], 'ssod~init': ssod_moved[g] / size[g],
                           'ce~init': ce_moved[g] / size[g]} for g in apart}}


def describe(r: dict) -> str:
    b = r['groups'][WHOLE]
    return ', '.join(f'{k} {v:.4f}' for k, v in b.items())


def write(results: List[dict], path: Path) -> None:
    configs: Dict[str, List[dict]] = {}
    for r in results:
        name = r['run'].rsplit('-s', 1)[0]
        configs.setdefault('CE, another seed' if name == r['ce_run'].rsplit('-s', 1)[0] else f'`{name}`', []).append(r)
    groups = list(results[0]['groups'])
    lines = ['# How far SSOD training moves the backbone from its CE twin', '',
             'Written by `python benchmarks/weight_drift.py` (see its docstring). Relative L2 distances of the '
             'backbone\'s learned parameters (classifier, OOD head and BatchNorm running statistics left out), '
             'mean ± sd over the runs of each configuration. '
             '`SSOD~CE`: ||w_ssod - w_ce|| / ||w_ce - w_init|| (0: the CE twin\'s weights; 1: as far apart as '
             'training moves the twin). `moved`: ||w - w_init|| / ||w_init||, in %.', '',
             '| configuration | runs | module | SSOD~CE | SSOD moved (%) | CE moved (%) |',
             '|---|---|---|---:|---:|---:|']
    for name, rs in configs.items():
        for g in groups:
            cells = [mean_sd([r['groups'][g][key] * 100 for r in rs]) for key in ('ssod~ce', 'ssod~init', 'ce~init')]
            lines.append(f'| {name} | {len(rs)} | {g} | {cells[0]} % | {cells[1]} | {cells[2]} |')
    lines += ['', 'Runs: ' + ', '.join(f'`{r["run"]}` (CE twin `{r["ce_run"]}`)' for r in results), '']
    figure = path.with_suffix('.png')
    plot(configs, groups, figure)
    lines[3:3] = ['', f'![how far each backbone stage moved from the init]({figure.name})']
    path.write_text('\n'.join(lines))


def plot(configs: Dict[str, List[dict]], groups: List[str], path: Path) -> None:
    """Per backbone stage: how far each configuration's runs moved from the init (mean, sd bars), the CE twins
    once (the same twins serve every configuration)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    bars = {f'{name.strip("`")} (SSOD)': [[r['groups'][g]['ssod~init'] * 100 for r in rs] for g in groups]
            for name, rs in configs.items() if not name.startswith('CE')}
    twins = {r['ce_run']: r for rs in configs.values() for r in rs if not r['run'].startswith('ce-')}
    bars['CE twins'] = [[r['groups'][g]['ce~init'] * 100 for r in twins.values()] for g in groups]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(bars)
    for i, (label, per_group) in enumerate(bars.items()):
        values = torch.tensor(per_group, dtype=torch.float64)
        sd = values.std(1) if values.shape[1] > 1 else torch.zeros(len(groups))
        ax.bar([j + (i - (len(bars) - 1) / 2) * width for j in range(len(groups))], values.mean(1), width, yerr=sd,
               capsize=2, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel('||w - w_init|| / ||w_init|| (%)')
    ax.set_title('How far training moved each backbone stage from the shipped CE init (learned parameters)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    run_pairs(argv, __doc__, OUT, measure, write, describe)


if __name__ == '__main__':
    main()
