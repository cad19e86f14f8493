"""Why SSOD's OOD head trails the classifier's own position readout: probes on frozen per-position features.

The study (``benchmarks/study.py``) found that the best readout of an SSOD model, the mean MaxLogit of its 3 best
feature-map positions, is no better than the same readout of its cross-entropy twin, and that every readout of the
trained OOD head (Eq. 15 pooled, the best position's P_ID, ...) is worse than it, even on ``textures``: the
benchmark's own backgrounds, the very thing the head is trained to call OOD. Two explanations are testable on
frozen features, without retraining:

1. **Capacity.** The OOD head is one linear function of a position's features; the classifier's MaxLogit is the
   maximum of M linear functions. "Any of the M classes" is a union of M directions, which one hyperplane can only
   approximate. Probe: fit, on the sampler's own labels (Eq. 12, LWB as in training), a linear head (a refit of
   the trained one, as a check) and a one-hidden-layer MLP head, and read both out per position.
2. **Features.** Joint training should make the backbone's features better for the OOD head than cross-entropy
   alone. Probe: the same heads fitted on the CE twin's frozen features.
3. **Class-agnostic target.** The OOD head answers "object of some ID class or background"; MaxLogit asks "how
   much like *one* ID class". Probe: a class-conditional linear head, one sigmoid per class, fitted on the same
   sampled patches (an ID patch positive for its image's class only, an OOD patch negative for all), read out
   as its best class's logit.

Limits: the probes see the evaluation transform's features (the trained head saw RandomResizedCrop ones), so
the linear probe is a refit of the head's *form*, not of its training; ``positions`` follows
``forward_positions`` for heads that pool before their last layers (ResNets, the study's ``test_resnet``), not
MobileNetV3's per-position ``conv_head``, and expects a square feature map.

Every figure is on the study's *validation* data (generator seed 1 and Fashion-MNIST); no test set is read.
Patch level: AUROC of object cells (mask covers > 5% of the cell) against cells with no object pixel, on 500 ID
validation images. Image level: FPR95 / AUROC of the best position and of the mean of the 3 best, ID validation
against each validation OOD set.

Usage::

    python benchmarks/probe_ood_head.py --run lrdecay-e16-s0 --ce-run ce-batch_size64-epochs16-lr0.0005-lr_step4-s0
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, mean_sd, save_figure  # noqa: E402
from study import CACHE, benchmarks, eval_sets  # noqa: E402

from ssod_zoo.adapter import ID_INDEX  # noqa: E402
from ssod_zoo.app import train as train_mod  # noqa: E402
from ssod_zoo.hub import load_checkpoint  # noqa: E402
from ssod_zoo.loss import OOD_INDEX, sample_patches  # noqa: E402
from ssod_zoo.metrics import auroc, ood_metrics  # noqa: E402

OUT = RESULTS / 'probe_ood_head'


@torch.no_grad()
def positions(model, x: torch.Tensor):
    """Per-position pre-logits (B, h*w, C), class logits (B, h*w, M) and trained-head ID logit (B, h*w)."""
    features = model.forward_features(x)
    b, c, h, w = features.shape
    pre = model.forward_head(features.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1), pre_logits=True)
    pre = pre.flatten(1)
    cls = model.get_classifier()(pre)
    ood = model.ood_head(pre) if hasattr(model, 'ood_head') else torch.zeros(len(pre), 2)
    return pre.view(b, h * w, -1), cls.view(b, h * w, -1), (ood[:, ID_INDEX] - ood[:, OOD_INDEX]).view(b, h * w)


@torch.no_grad()
def collect(model, loader) -> Dict[str, torch.Tensor]:
    out: Dict[str, List[torch.Tensor]] = {'pre': [], 'cls': [], 'head': [], 'y': []}
    for x, y in loader:
        pre, cls, head = positions(model, x)
        for k, v in zip(out, (pre, cls, head, y)):
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def fit_head(pre: torch.Tensor, labels: torch.Tensor, hidden: int, epochs: int = 30, seed: int = 0,
             classes: Optional[torch.Tensor] = None) -> nn.Module:
    """A head on frozen features, fitted on the sampler's labels, loss-wise balanced (the mean of the ID and the
    OOD patches' losses, as SSOD's LWB), AdamW, minibatches of 4096 positions, 30 epochs.

    ``classes`` None: the binary ID/OOD head (2 outputs, cross-entropy), linear or with one hidden layer.
    ``classes`` (N,) given: a class-conditional linear head, one sigmoid per class (one-vs-all); an ID patch is
    positive for its image's class only, an OOD patch negative for every class.
    """
    torch.manual_seed(seed)
    keep = labels != -1
    x, t = pre[keep], labels[keep]
    c = x.shape[1]
    if classes is not None:
        y = classes[keep]
        num = int(classes.max()) + 1
        head = nn.Linear(c, num)
    else:
        head = nn.Linear(c, 2) if hidden == 0 else nn.Sequential(nn.Linear(c, hidden), nn.ReLU(),
                                                                 nn.Linear(hidden, 2))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(4096):
            out = head(x[idx])
            if classes is None:
                loss_each = F.cross_entropy(out, t[idx], reduction='none')
            else:
                target = F.one_hot(y[idx], num).float() * (t[idx] == ID_INDEX).float()[:, None]
                loss_each = F.binary_cross_entropy_with_logits(out, target, reduction='none').sum(1)
            parts = [loss_each[t[idx] == k].mean() for k in (ID_INDEX, OOD_INDEX) if (t[idx] == k).any()]
            loss = torch.stack(parts).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return head.eval()


@torch.no_grad()
def head_logit(head: nn.Module, pre: torch.Tensor, per_class: bool = False) -> torch.Tensor:
    """(N, P) ID score of each position: the ID-minus-OOD logit, or for a class-conditional head its best
    class's logit."""
    n, p, c = pre.shape
    out = head(pre.reshape(n * p, c))
    return (out.amax(1) if per_class else out[:, ID_INDEX] - out[:, OOD_INDEX]).view(n, p)


def readouts(pos_score: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {'max': pos_score.amax(1), 'top3': pos_score.topk(3, dim=1).values.mean(1)}


def probe(run: str, ce_run: Optional[str], train_images: int, hidden: int, seed: int) -> dict:
    benches = benchmarks()
    model, ckpt = load_checkpoint(CACHE / 'runs' / run / 'last.pt')
    model.eval()
    cfg = ckpt['config']
    tf = train_mod._transforms(model, train_mod.TrainConfig(img_size=cfg['img_size'], crop_pct=1.0))[1]
    train = benches['test'].train_dataset(tf)  # the training split the model was trained on: probes fit there
    train = Subset(train, torch.linspace(0, len(train) - 1, train_images).long().tolist())
    sets = eval_sets(benches, 'val', tf)
    loader = lambda ds: DataLoader(ds, batch_size=128, num_workers=2)  # noqa: E731
    # patch level: masks of the first 500 ID validation images (the study's sampler measurement)
    samples = [benches['val'].render('val', i) for i in range(500)]
    x_masks = torch.stack([tf(s.image) for s in samples])
    masks = torch.stack([torch.from_numpy(s.mask).float() for s in samples])[:, None]

    models = {'ssod': model}
    if ce_run:
        models['ce'] = load_checkpoint(CACHE / 'runs' / ce_run / 'last.pt')[0].eval()
    result: dict = {'run': run, 'ce_run': ce_run, 'train_images': train_images, 'hidden': hidden, 'seed': seed,
                    'gamma': cfg['gamma'], 'ood_rule': cfg.get('ood_rule', 'paper'), 'features': {}}
    for feat_name, m in models.items():
        t0 = time.time()
        tr = collect(m, loader(train))
        n, p, _ = tr['cls'].shape
        side = int(p ** 0.5)
        labels = sample_patches(tr['cls'].permute(0, 2, 1).reshape(n, -1, side, side), tr['y'], cfg['gamma'],
                                result['ood_rule']).flatten(1)
        heads = {'linear_probe': fit_head(tr['pre'], labels, 0, seed=seed),
                 'mlp_probe': fit_head(tr['pre'], labels, hidden, seed=seed),
                 'class_probe': fit_head(tr['pre'], labels, 0, seed=seed, classes=tr['y'][:, None].expand(n, p))}
        scorers = {
            'maxlogit': lambda pre, cls, head: cls.amax(2),
            **{name: (lambda pre, cls, head, h=h, c=name == 'class_probe': head_logit(h, pre, c))
               for name, h in heads.items()}}
        if feat_name == 'ssod':
            scorers['trained_head'] = lambda pre, cls, head: head
        # patch level
        pre_m, cls_m, head_m = positions(m, x_masks)
        cover = F.adaptive_avg_pool2d(masks, side).flatten(1)
        on, off = cover > 0.05, cover == 0
        patch = {k: 100 * auroc(s(pre_m, cls_m, head_m)[on], s(pre_m, cls_m, head_m)[off]) for k, s in scorers.items()}
        # image level, validation sets
        scored = {name: collect(m, loader(ds)) for name, ds in sets.items()}
        image: dict = {}
        for k, s in scorers.items():
            per = {name: readouts(s(d['pre'], d['cls'], d['head'])) for name, d in scored.items()}
            for agg in ('max', 'top3'):
                row = {name: {mm: 100 * float(v) for mm, v in ood_metrics(per['id'][agg], per[name][agg]).items()}
                       for name in per if name != 'id'}
                row['average'] = {mm: sum(r[mm] for r in row.values()) / len(row) for mm in ('fpr95', 'auroc')}
                image[f'{k}_{agg}'] = row
        frac = {'sampled_id': 100 * float((labels == ID_INDEX).float().mean()),
                'sampled_ood': 100 * float((labels == OOD_INDEX).float().mean())}
        result['features'][feat_name] = {'patch_auroc': patch, 'image': image, 'sampler_on_train': frac,
                                         'seconds': round(time.time() - t0, 1)}
        print(f'[probe] {feat_name} features: patch AUROC ' +
              ', '.join(f'{k} {v:.1f}' for k, v in patch.items()) + '; image average FPR95 (top3) ' +
              ', '.join(f'{k} {image[f"{k}_top3"]["average"]["fpr95"]:.1f}' for k in scorers), flush=True)
    result['environment'] = environment()
    return result


LABELS = {'maxlogit': 'MaxLogit (classifier)', 'trained_head': 'trained OOD head', 'linear_probe': 'linear head',
          'mlp_probe': 'MLP head', 'class_probe': 'class-conditional head'}


def _over_runs(results: List[dict]) -> Dict[tuple, Dict[str, List[float]]]:
    """(features, scorer) -> {'patch', 'max', 'top3'}: one value per run."""
    rows: Dict[tuple, Dict[str, List[float]]] = {}
    for r in results:
        for feat, f in r['features'].items():
            for k, v in f['patch_auroc'].items():
                row = rows.setdefault((feat, k), {'patch': [], 'max': [], 'top3': []})
                row['patch'].append(v)
                for agg in ('max', 'top3'):
                    row[agg].append(f['image'][f'{k}_{agg}']['average']['fpr95'])
    return rows


def plot(results: List[dict], path: Path) -> None:
    """Patch skill (x) against image-level detection (y), one point per head and features, sd over the runs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = dict(zip(LABELS, ('tab:blue', 'tab:red', 'tab:orange', 'tab:purple', 'tab:green')))
    for (feat, k), v in _over_runs(results).items():
        x, y = torch.tensor(v['patch']), torch.tensor(v['top3'])
        sd = (lambda t: float(t.std()) if len(t) > 1 else 0.0)
        ax.errorbar(float(x.mean()), float(y.mean()), xerr=sd(x), yerr=sd(y), fmt='o' if feat == 'ssod' else 's',
                    mfc=colours[k] if feat == 'ssod' else 'white', color=colours[k], capsize=2,
                    label=f'{LABELS[k]}, {"SSOD" if feat == "ssod" else "CE twin"} features')
    ax.set_xlabel('patch AUROC: object cells vs background cells (%), higher = better objectness')
    ax.set_ylabel('image FPR95, mean of the 3 best positions (%)')
    ax.set_title(f'Fitting the sampled patches is not detecting OOD images ({len(results)} runs, validation)',
                 fontsize=9)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def write_markdown(results: List[dict], path: Path) -> None:
    lines = ['# Probes of the OOD head on frozen per-position features', '',
             'Written by `python benchmarks/probe_ood_head.py` (see its docstring). Validation data only.',
             'Patch AUROC: object cells against cells without an object pixel (500 ID validation images).',
             'Image FPR95: average over the validation OOD sets (near, textures, domain, fmnist), '
             'ID validation images positive; `max` = best position, `top3` = mean of the 3 best.', '']
    rows = _over_runs(results)
    lines += ['![patch AUROC against image FPR95](probe.png)', '',
              f'## Over the {len(results)} runs ({", ".join(r["run"] for r in results)}): mean ± sd', '',
              '| features | scorer | patch AUROC | FPR95 best position | FPR95 3 best positions |',
              '|---|---|---:|---:|---:|']
    lines += [f'| {feat} | {k} | {mean_sd(v["patch"])} | {mean_sd(v["max"])} | {mean_sd(v["top3"])} |'
              for (feat, k), v in rows.items()]
    lines.append('')
    for r in results:
        lines += [f'## `{r["run"]}` (CE twin `{r["ce_run"]}`), {r["train_images"]} training images, '
                  f'MLP hidden {r["hidden"]}, probe seed {r["seed"]}', '',
                  '| features | scorer | patch AUROC | FPR95 max | FPR95 top3 | near | textures | domain | fmnist |',
                  '|---|---|---:|---:|---:|---:|---:|---:|---:|']
        for feat, f in r['features'].items():
            for k, v in f['patch_auroc'].items():
                top3 = f['image'][f'{k}_top3']
                sets = [top3.get(s, {}).get('fpr95') for s in ('near', 'textures', 'domain', 'fmnist')]
                lines.append(f'| {feat} | {k} | {v:.1f} | {f["image"][f"{k}_max"]["average"]["fpr95"]:.1f} | '
                             f'{top3["average"]["fpr95"]:.1f} | ' +
                             ' | '.join('' if s is None else f'{s:.1f}' for s in sets) + ' |')
        lines += ['', 'Sampler on the probes\' training positions (% ID / % OOD): ' + '; '.join(
            f'{feat} {f["sampler_on_train"]["sampled_id"]:.1f} / {f["sampler_on_train"]["sampled_ood"]:.1f}'
            for feat, f in r['features'].items()), '']
    path.write_text('\n'.join(lines) + '\n')


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--run', default='lrdecay-e16-s0', help='an SSOD run under the study cache')
    p.add_argument('--ce-run', default='ce-batch_size64-epochs16-lr0.0005-lr_step4-s0', help="its CE twin's run")
    p.add_argument('--train-images', type=int, default=2000, help='ID training images the probes are fitted on')
    p.add_argument('--hidden', type=int, default=256, help='hidden units of the MLP probe')
    p.add_argument('--seed', type=int, default=0, help='probe initialisation seed')
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    result = probe(args.run, args.ce_run, args.train_images, args.hidden, args.seed)
    (OUT / f'{args.run}-h{args.hidden}-p{args.seed}.json').write_text(json.dumps(result, indent=1))
    # the summary: every seed of this run's configuration probed with these settings ('summary.md' and
    # 'probe.png' for the study's choice, lrdecay-e16; '<config>.md' and '<config>.png' for any other)
    config = args.run.rsplit('-s', 1)[0]
    files = sorted(OUT.glob(f'{config}-s*-h{args.hidden}-p{args.seed}.json'))
    results = [r for r in map(lambda f: json.loads(f.read_text()), files)
               if r['train_images'] == args.train_images and r['run'].rsplit('-s', 1)[0] == config]
    name = 'summary' if config == 'lrdecay-e16' else config
    write_markdown(results, OUT / f'{name}.md')
    plot(results, OUT / ('probe.png' if name == 'summary' else f'{name}.png'))
    print(f'[probe] wrote {OUT}', flush=True)


if __name__ == '__main__':
    main()
