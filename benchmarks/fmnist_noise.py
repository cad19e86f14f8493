"""Which kinds of non-photograph get through the Fashion-MNIST weight, rule by rule, at the shipped thresholds.

The fashion-mnist protocol's far-OOD set ``noise`` (:class:`ssod_zoo.app.protocols.SyntheticFar`) mixes blank
frames with four kinds of noise; ``ssod eval`` reports it as one set. This splits it by kind and reports the share
of each that ``ssod_resnet18.fmnist`` accepts as a garment with each rule at the thresholds it ships
(``spatial_threshold``, ``ood_threshold``), and its cross-entropy twin with its one rule, beside the share of ID
test images kept. Both draws: validation (what chose the weight's readout) and test.

Usage::

    python benchmarks/fmnist_noise.py [--data-root /usr/share/datasets/fashion-mnist]
"""
import argparse
import sys
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, environment, environment_markdown, markdown_table, write_json  # noqa: E402

import ssod_zoo  # noqa: E402,F401  (registers the models)
from ssod_zoo.app.protocols import FAR_KINDS, FAR_VERSION, fashion_mnist, limited  # noqa: E402

OUT = RESULTS / 'fmnist_noise'


@torch.no_grad()
def scores(model, ds, tf, batch: int = 250):
    xs = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    return [model.forward_scores(xb) for xb in xs.split(batch)]


def accepted(model, ds, tf) -> dict:
    """Share (%) of ``ds`` each of the model's rules keeps, at its own thresholds."""
    out = scores(model, ds, tf)
    kept = {'spatial': model.accepts(torch.cat([o.spatial_score for o in out]), readout='spatial')}
    if model.ood_head_trained:
        kept['factor'] = model.accepts(torch.cat([o.ood_factor for o in out]), readout='factor')
    return kept


def measure(data_root: Path) -> dict:
    models = {'ssod': timm.create_model('ssod_resnet18.fmnist', pretrained=True).eval(),
              'ce': timm.create_model(f'local-dir:{REPO / "weights/init/resnet18_fmnist_ce"}', pretrained=True).eval()}
    tf = create_transform(**resolve_data_config(model=models['ssod']))
    data = fashion_mnist(data_root)
    sets = {'id test (1,000)': limited(data.test, 1000), 'noise, validation draw': data.ood_val['noise'],
            'noise, test draw': data.ood['noise']}
    rows = {}
    for name, ds in sets.items():
        for m, model in models.items():
            for rule, kept in accepted(model, ds, tf).items():
                col = f'{m} {rule}'
                if hasattr(ds, 'kind'):
                    kinds = [ds.kind(i) for i in range(len(ds))]
                    for kind in FAR_KINDS:
                        sel = torch.tensor([k == kind for k in kinds])
                        rows.setdefault(f'{name}: {kind}', {})[col] = 100 * float(kept[sel].float().mean())
                rows.setdefault(f'{name}: all', {})[col] = 100 * float(kept.float().mean())
    return {'far_version': FAR_VERSION, 'readout': models['ssod'].readout,
            'thresholds': {'spatial': models['ssod'].spatial_threshold, 'factor': models['ssod'].ood_threshold,
                           'ce spatial': models['ce'].spatial_threshold},
            'accepted_pct': rows}


def write(r: dict, env: dict) -> None:
    cols = ['ssod spatial', 'ssod factor', 'ce spatial']
    table = markdown_table(['images', *[f'`{c}` kept %' for c in cols]],
                           [[k, *[f'{v[c]:.1f}' for c in cols]] for k, v in r['accepted_pct'].items()])
    md = ['# The Fashion-MNIST weight on blank frames and noise, kind by kind', '',
          'Written by `python benchmarks/fmnist_noise.py` (see its docstring): the share of each set that each rule '
          'keeps as a garment at the thresholds the weights ship (SSOD: `spatial_threshold` '
          f"{r['thresholds']['spatial']:.4g}, `ood_threshold` {r['thresholds']['factor']:.4g}; CE twin: "
          f"`spatial_threshold` {r['thresholds']['ce spatial']:.4g}). `ssod_resnet18.fmnist`'s readout: "
          f"`{r['readout']}`. `SyntheticFar` version {r['far_version']}; 100 images of each kind in the validation "
          'draw, 200 in the test draw. Lower is better for noise; near 95% is right for ID.', '', table, '',
          environment_markdown(env), '']
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / 'summary.md').write_text('\n'.join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data-root', type=Path, default=Path('/usr/share/datasets/fashion-mnist'))
    args = ap.parse_args()
    env = environment()
    r = measure(args.data_root)
    write_json(OUT / 'results.json', {'environment': env, **r})
    write(r, env)
    print((OUT / 'summary.md').read_text())


if __name__ == '__main__':
    main()
