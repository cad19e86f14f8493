"""``ssod demo --out DIR``: SSOD against the post-hoc detectors on the embedded benchmark, on a CPU, in minutes.

1. Generates the embedded benchmark (:mod:`ssod_zoo.app.synthetic`; cached).
2. Takes the two models to compare: by default the shipped ones (``weights/demo/``: an SSOD model and its
   cross-entropy twin, trained by the study's CPU recipe ``lrdecay-e16``, seed 0; ``weights/demo/README.md`` has the
   command and its wall time). With ``--retrain`` it trains them here instead (12-16 minutes on 2 CPU cores): from a
   classifier that already works, as the paper does (it fine-tunes an ImageNet classifier; the sampler needs confident
   patches), the cross-entropy ``test_resnet`` in ``weights/init/`` (``--init ''``: from scratch for
   ``--warmup-epochs``), two fine-tuning runs with the same budget (``--ssod-epochs``), data order and learning rate:
   one with the SSOD objective, one with cross-entropy only (the baseline model).
3. Scores the ID validation set and every OOD set with every SSOD readout (the study's choice, the paper's Eq. 15,
   ...) and with MSP, MaxLogit, Energy, ODIN, ReAct, KNN, Mahalanobis, ViM and the position readouts on the
   cross-entropy model (fitted on training features), and writes ``results.json``, ``results.md``, ``roc.png``,
   ``histograms.png`` and ``sampler.png`` to DIR, and both models as hub-ready folders to DIR/models.

No checkpoint is selected on OOD data: both models are the last epoch's.
"""
import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .._pretrained import _weights_dir
from ..hub import load_checkpoint, load_model, save_pretrained
from .cli import AT_LEAST_0, AT_LEAST_1, HelpFormatter, bounded
from .evaluate import evaluate, results_markdown, write_results
from .plots import plot_histograms, plot_roc, plot_sampler
from .report import deployed_thresholds, deployment_report, write_scores_csv
from .synthetic import GENERATOR_VERSION, BenchmarkConfig, SyntheticBenchmark
from .train import RANGES, TrainConfig, train

__all__ = ['main']

# the package's weights folder (installed: ssod_zoo/_weights; source checkout or editable install: <repo>/weights)
_WEIGHTS = _weights_dir() or Path(__file__).resolve().parents[2] / 'weights'
SHIPPED_INIT = _WEIGHTS / 'init' / 'test_resnet_synthetic_ce.safetensors'
SHIPPED_MODELS = _WEIGHTS / 'demo'  # ssod/, ce/ (hub-ready folders) and recipe.json
BOOTSTRAP = 1000  # resamples for the FPR95 / AUROC intervals, as `ssod eval`'s default
# the options that only a training run uses: given without --retrain they would silently do nothing
TRAINING_OPTIONS = ('model', 'model_kwargs', 'init', 'warmup_epochs', 'ssod_epochs', 'batch_size', 'lr', 'lr_step',
                    'gamma', 'alpha', 'seed')


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='ssod demo', description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--out', default='demo_out', help='output directory')
    p.add_argument('--retrain', action='store_true', help='train both models here (the options below marked '
                   '"training") instead of evaluating the shipped ones; 12-16 minutes on 2 CPU cores')
    # the study's CPU recipe (benchmarks/study.py, 'lrdecay-e16'): the shipped models were trained with it
    p.add_argument('--model', default='ssod_test_resnet', help='training: the architecture')
    p.add_argument('--model-kwargs', nargs='*', default=['output_stride=16'],
                   help='training: output_stride=16 gives a 6x6 feature map at 96 px, patches to sample')
    p.add_argument('--init', default=str(SHIPPED_INIT) if SHIPPED_INIT.exists() else '',
                   help='training: cross-entropy classifier to fine-tune from (default: the shipped one); '
                        '\'\' = from scratch')
    p.add_argument('--warmup-epochs', type=bounded(int, *AT_LEAST_1), default=8,
                   help='training, without --init: cross-entropy epochs from scratch')
    p.add_argument('--ssod-epochs', type=bounded(int, *RANGES['epochs']), default=16,
                   help='training: epochs of each of the two runs')
    p.add_argument('--batch-size', type=bounded(int, *RANGES['batch_size']), default=64, help='training')
    p.add_argument('--lr', type=bounded(float, *RANGES['lr']), default=5e-4,
                   help='training: fine-tuning a small network on a small set')
    p.add_argument('--lr-step', type=bounded(int, *AT_LEAST_0), default=4,
                   help='training: halve the learning rate every N epochs (0: never)')
    p.add_argument('--gamma', type=bounded(float, *RANGES['gamma']), default=0.95,
                   help='training: the sampler\'s threshold (Eq. 12)')
    p.add_argument('--alpha', type=bounded(float, *RANGES['alpha']), default=1.0,
                   help='training: the OOD loss weight (Eq. 14)')
    p.add_argument('--train-per-class', type=bounded(int, *AT_LEAST_1), default=400,
                   help='benchmark training images per class: the training split, and the detectors\' fit set')
    p.add_argument('--val-per-class', type=bounded(int, *AT_LEAST_1), default=100,
                   help='benchmark ID validation images per class: the ID set every detector is scored on')
    p.add_argument('--ood-per-set', type=bounded(int, *AT_LEAST_1), default=1000,
                   help='benchmark images per OOD set (near, textures, domain)')
    p.add_argument('--seed', type=int, default=0, help='training: the training seed and the benchmark\'s')
    p.add_argument('--workers', type=bounded(int, *RANGES['workers']), default=2,
                   help='image-loading and generating processes')
    p.add_argument('--bench-root', default='', help='benchmark cache (default: DIR/benchmark)')
    p.add_argument('--quick', action='store_true', help='a tiny run to check the pipeline, not for numbers')
    p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                   help='progress bars on stderr (default: only on a terminal; the stage lines are always there)')
    args = p.parse_args(argv)
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    if args.quick:
        args.retrain, args.init, args.warmup_epochs, args.ssod_epochs, args.batch_size = True, '', 1, 1, 16
        args.train_per_class, args.val_per_class, args.ood_per_set = 8, 4, 12
    given = [k for k in TRAINING_OPTIONS if getattr(args, k) != p.get_default(k)]
    if not args.retrain and given:
        p.error(f'{", ".join("--" + k.replace("_", "-") for k in given)} only apply to training: add --retrain '
                '(without it the demo evaluates the shipped models)')
    if not args.retrain and not (SHIPPED_MODELS / 'recipe.json').is_file():
        p.error(f'the shipped demo models are missing ({SHIPPED_MODELS}): add --retrain to train them')
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    runs = out / 'runs'
    torch.manual_seed(args.seed)

    def stage(text: str) -> None:
        print(f'[{time.time() - t0:5.0f} s] {text}', file=sys.stderr, flush=True)

    stage('generating the embedded benchmark')
    bench_cfg = BenchmarkConfig(train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                ood_per_set=args.ood_per_set, seed=args.seed)
    bench = SyntheticBenchmark(args.bench_root or out / 'benchmark', bench_cfg).prepare(
        workers=args.workers, progress=args.progress)

    if args.retrain:
        (ssod_model, ssod_config), (ce_model, ce_config) = _train_both(args, bench, runs, stage)
    else:
        (ssod_model, ssod_config), (ce_model, ce_config) = _shipped_models(stage)

    stage('scoring with SSOD and every baseline')
    # the models carry the preprocessing they were trained with (96 px, crop 1.0)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ssod_model))
    loader = lambda ds: DataLoader(ds, batch_size=128, num_workers=args.workers)  # noqa: E731
    sets = {'id': bench.val_dataset(transform), **bench.ood_datasets(transform)}
    results = evaluate(ssod_model.eval(), loader(sets['id']), {k: loader(v) for k, v in sets.items() if k != 'id'},
                       baseline_model=ce_model.eval(), fit_loader=loader(bench.train_dataset(transform)),
                       progress=args.progress)
    # what a deployment decides with, as `ssod eval` reports it: accept rates at the SSOD model's thresholds and
    # bootstrap intervals (`ssod eval --bootstrap`'s default resamples and seed)
    deployment, deployment_keys = deployment_report(results['scores'], results['ood'], ssod_model, BOOTSTRAP,
                                                    baseline='ce')
    config = {'benchmark': dataclasses.asdict(bench_cfg),
              'demo': {k: v for k, v in vars(args).items() if k not in ('out', 'bench_root')},
              'models': 'trained here (--retrain)' if args.retrain else f'shipped ({SHIPPED_MODELS})',
              'train': ssod_config, 'model': ssod_config['model'], 'thresholds': deployed_thresholds(ssod_model)}

    stage('hub-ready folders of both models')
    for name, model, train_config in (('ssod', ssod_model, ssod_config), ('ce', ce_model, ce_config)):
        # the shipped folders' thresholds were calibrated on the study's validation draw, which their card names
        calibration = None if args.retrain else json.loads(
            (SHIPPED_MODELS / name / 'config.json').read_text()).get('calibration')
        save_pretrained(model, out / 'models' / name, train_config=train_config, calibration=calibration,
                        class_names=model.pretrained_cfg['label_names'],
                        # the embedded benchmark's sets, the ones README's headline calls the test sets
                        metrics={'id_accuracy': results['id_accuracy'][name], 'id_dataset': 'ssod_zoo synthetic',
                                 'split': 'test',
                                 'ood': {k: v['ssod'] for k, v in results['ood'].items() if k != 'average'}}
                        if name == 'ssod' else None)

    stage('plots')
    write_results(results, out, config, sections=[deployment], extra=deployment_keys)
    write_scores_csv(results['scores'], {k: [str(p) for p, _ in v.samples] for k, v in sets.items()},
                     out / 'scores.csv', targets={'id': torch.as_tensor(sets['id'].targets)})
    plot_roc(results['scores'], out / 'roc.png', baseline='ce')
    plot_histograms(results['scores'], out / 'histograms.png',
                    thresholds={**deployed_thresholds(ssod_model), 'maxlogit_spatial_top3': ce_model.spatial_threshold})
    train_set = bench.train_dataset(transform)
    picks = Subset(train_set, torch.linspace(0, len(train_set) - 1, 8).long().tolist())
    images, targets = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in picks]))
    mean, std = ssod_model.pretrained_cfg['mean'], ssod_model.pretrained_cfg['std']
    plot_sampler({'CE model': ce_model, 'SSOD model': ssod_model}, images, targets, out / 'sampler.png', mean, std,
                 ssod_config['gamma'])

    print('\n' + results_markdown(results))
    stage(f'done: {out}/results.json, results.md, scores.csv, roc.png, histograms.png, sampler.png; '
          f'models in {out}/models/ssod and {out}/models/ce (timm.create_model("local-dir:{out}/models/ssod", '
          'pretrained=True))')
    (out / 'timing.json').write_text(json.dumps({'wall_seconds': round(time.time() - t0, 1)}))
    return results


def _shipped_models(stage) -> Tuple[Tuple[nn.Module, dict], Tuple[nn.Module, dict]]:
    """The shipped SSOD model and CE twin (``weights/demo``), with their training configs."""
    recipe = json.loads((SHIPPED_MODELS / 'recipe.json').read_text())
    if recipe['generator_version'] != GENERATOR_VERSION:
        raise SystemExit(f'the shipped demo models were trained on benchmark generator version '
                         f'{recipe["generator_version"]}, this is version {GENERATOR_VERSION}: add --retrain')
    stage(f'the shipped models ({SHIPPED_MODELS}: the study\'s recipe, '
          f'{recipe["models"]["ssod"]["epochs"]} epochs each; --retrain trains them here)')
    return tuple((load_model(SHIPPED_MODELS / name), recipe['models'][name]['config']) for name in ('ssod', 'ce'))


def _train_both(args: argparse.Namespace, bench: SyntheticBenchmark, runs: Path, stage):
    """The SSOD run and its cross-entropy twin: same init, budget, learning rate and data order."""
    warmup = 0 if args.init else args.warmup_epochs
    total = warmup + args.ssod_epochs
    common = TrainConfig(
        model=args.model, model_kwargs=list(args.model_kwargs), data='folder',
        train_dir=str(bench.root / 'id' / 'train'), val_dir=str(bench.root / 'id' / 'val'),
        # measured once, after the last epoch, into the checkpoint's metrics; never used to select one
        ood_dirs=[str(bench.root / 'ood' / k) for k in bench.ood_sets], img_size=bench.config.image_size,
        crop_pct=1.0, scale_min=0.5, batch_size=args.batch_size, lr=args.lr, lr_step=args.lr_step or total + 1,
        gamma=args.gamma, alpha=args.alpha, workers=args.workers, seed=args.seed, eval_every=0,
        progress=args.progress, init=args.init, epochs=total)
    (runs / 'ssod').mkdir(parents=True, exist_ok=True)
    if not args.init:  # from scratch: one cross-entropy warm-up, shared by both runs
        stage(f'cross-entropy warm-up from scratch: {warmup} epochs')
        train(dataclasses.replace(common, epochs=warmup, ce_only=True, out_dir=str(runs / 'ce')))
        shutil.copy(runs / 'ce' / 'last.pt', runs / 'ssod' / 'last.pt')
        common = dataclasses.replace(common, resume='auto')
    stage(f'SSOD: {args.ssod_epochs} epochs with the OOD loss, from {args.init or "the warm-up"}')
    train(dataclasses.replace(common, out_dir=str(runs / 'ssod')))
    stage(f'cross-entropy baseline: the same {args.ssod_epochs} epochs without it')
    train(dataclasses.replace(common, ce_only=True, out_dir=str(runs / 'ce')))

    ssod_model, ssod_ckpt = load_checkpoint(runs / 'ssod' / 'last.pt')
    ce_model, ce_ckpt = load_checkpoint(runs / 'ce' / 'last.pt')
    return (ssod_model, ssod_ckpt['config']), (ce_model, ce_ckpt['config'])


if __name__ == '__main__':
    main()
