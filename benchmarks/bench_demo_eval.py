"""How long would ``ssod demo`` score a 224 px ResNet-18 pair on this CPU? Measured side by side with the shipped pair.

The demo scores its shipped SSOD model and CE twin (``weights/demo``: test_resnet, 96 px) with every readout and
baseline on the embedded benchmark's test sets, fitting KNN, Mahalanobis and ViM on its training images. The
study's rule now chooses ``r18-224-scratch`` (ResNet-18 from scratch at 224 px, trained on a GPU). Whether the demo
could ship that pair instead turns, among other things, on how long its scoring stage takes on 2 CPU cores. This
runs exactly the demo's scoring call (``ssod_zoo.app.evaluate.evaluate``, batch 128, the demo's worker count) for
both pairs in one process, one after the other, and writes the wall times and their ratio. The ResNet-18 pair has
random weights: scoring costs the same whatever the weights are (every detector does a fixed amount of work per
image), and no trained 224 px weights exist on this machine.

Usage::

    python benchmarks/bench_demo_eval.py   # writes results/demo_eval_cpu.{json,md}
"""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import timm
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, environment_markdown, markdown_table, write_json  # noqa: E402

import ssod_zoo  # noqa: E402,F401  (registers the models)
from ssod_zoo.app.demo import SHIPPED_MODELS  # noqa: E402
from ssod_zoo.app.evaluate import evaluate  # noqa: E402
from ssod_zoo.app.synthetic import BenchmarkConfig, SyntheticBenchmark  # noqa: E402
from ssod_zoo.hub import load_model  # noqa: E402


def pair(kind: str):
    """(SSOD model, CE model, transform) of the shipped 96 px pair or a random 224 px ResNet-18 pair."""
    if kind == 'shipped':
        ssod, ce = (load_model(SHIPPED_MODELS / n) for n in ('ssod', 'ce'))
        return ssod, ce, timm.data.create_transform(**timm.data.resolve_data_config(model=ssod))
    torch.manual_seed(0)
    ssod, ce = (timm.create_model('ssod_resnet18', num_classes=10) for _ in range(2))
    cfg = timm.data.resolve_data_config(model=ssod)
    return ssod, ce, timm.data.create_transform(input_size=(3, 224, 224), crop_pct=1.0, interpolation='bilinear',
                                                mean=cfg['mean'], std=cfg['std'])


def score(kind: str, bench: SyntheticBenchmark, workers: int) -> dict:
    ssod, ce, transform = pair(kind)
    loader = lambda ds: DataLoader(ds, batch_size=128, num_workers=workers)  # noqa: E731
    t0 = time.perf_counter()
    evaluate(ssod.eval(), loader(bench.val_dataset(transform)),
             {k: loader(v) for k, v in bench.ood_datasets(transform).items()},
             baseline_model=ce.eval(), fit_loader=loader(bench.train_dataset(transform)), progress=True)
    return {'seconds': round(time.perf_counter() - t0, 1), 'img_size': transform.transforms[0].size,
            'model': ssod.pretrained_cfg.get('architecture', type(ssod).__name__)}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--bench-root', default=str(Path.home() / '.cache' / 'ssod_zoo' / 'study' / 'bench_seed0'),
                   help='the embedded benchmark (generated there if missing; the study caches it there)')
    p.add_argument('--workers', type=int, default=2, help="loader workers, the demo's default")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    bench = SyntheticBenchmark(args.bench_root, BenchmarkConfig()).prepare(workers=args.workers, progress=False)
    counts = {'id': len(bench.val_dataset()), **{k: len(v) for k, v in bench.ood_datasets().items()},
              'fit': len(bench.train_dataset())}
    runs = {kind: score(kind, bench, args.workers) for kind in ('shipped', 'resnet18_224')}
    ratio = runs['resnet18_224']['seconds'] / runs['shipped']['seconds']
    data = {'images': counts, 'runs': runs, 'ratio': round(ratio, 2), 'environment': environment()}
    out = RESULTS / 'demo_eval_cpu'
    write_json(out.with_suffix('.json'), data)
    rows = [[kind, r['model'], r['img_size'], r['seconds']] for kind, r in runs.items()]
    out.with_suffix('.md').write_text('\n'.join([
        "# The demo's scoring stage on this CPU: the shipped pair against a 224 px ResNet-18 pair", '',
        f'Images scored per model: {counts} (fit: KNN, Mahalanobis and ViM are fitted on the training images).', '',
        markdown_table(['pair', 'model', 'px', 'seconds (both models, every readout and baseline)'], rows), '',
        f'Ratio, 224 px ResNet-18 / shipped: {ratio:.2f}.', '', environment_markdown(data['environment']), '']))
    print(out.with_suffix('.md').read_text())


if __name__ == '__main__':
    main()
