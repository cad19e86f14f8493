"""Inference cost of each ssod_* model against the plain timm model with the same weights (issue 6, benchmark 1).

Goal: ssod / plain <= 1.03. The SSOD forward adds a 2-way linear head on the pooled features, a sigmoid and the
input check; one ``forward_head(..., pre_logits=True)`` pass serves the classifier and the OOD head. The backbone
is shared and identical, and the ssod logits are checked to equal the plain model's bit for bit before timing.

Method: both models are built once, in eval mode, under ``torch.inference_mode`` with a fixed thread count.
After warm-up, each repetition times the plain and the SSOD forward back to back, alternating which goes first,
so drift in machine load hits both alike; a timing is ``k`` forwards (``k`` chosen so one timing lasts at least
``--min-time`` s) divided by ``k``. Reported: the median of the repetitions for each model, the ratio of the
medians, and the spread of the per-repetition (paired) ratios. A repetition cap in seconds per case keeps the
slow cases (batch 32 of ResNet-101 on 2 CPU cores takes seconds per forward) within the run's time budget.

One intra-op thread by default: the ratio is what is measured, and on a shared machine several OpenMP threads
make timings collapse whenever another process takes a core (seen here on 2 cores with one other busy process:
resnet18, batch 1, 55 ms with 1 thread, 960 ms with 2). Pass ``--threads`` to measure otherwise.

A second, much more precise measurement isolates what SSOD adds: on the backbone's feature map, the plain head
(``forward_head``) against SSOD's head path (``pre_logits`` once, then the classifier, the OOD head and a sigmoid)
and the input check, timed over many iterations. Their difference divided by the plain forward is the overhead the
full-model ratio should show, free of the backbone's noise. The earlier two-pass head (``forward_head`` twice) is
timed beside it (keys ``fused_head``/``expected_ratio_with_fused_head`` in the JSON, for continuity).

Usage::

    python benchmarks/bench_inference.py                      # all ssod_* but ssod_test_resnet, batch 1 and 32
    python benchmarks/bench_inference.py --quick              # a smoke run: 2 models, small batches
    python benchmarks/bench_inference.py --device cuda        # results/inference_cuda.{json,md}
"""
import argparse
import gc
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, bootstrap_ratio_ci, environment, environment_markdown, load_average,  # noqa: E402
                     markdown_table, summary, write_json)

import timm  # noqa: E402
import ssod_zoo  # noqa: E402,F401  (registers the models even with SSOD_ZOO_AUTOLOAD=0)

GOAL = 1.03
QUICK_MODELS = ['ssod_resnet18', 'ssod_mobilenetv3_large_100']


def default_models() -> List[str]:
    return [m for m in timm.list_models('ssod_*') if m != 'ssod_test_resnet']


def build_pair(name: str, device: torch.device):
    """The SSOD model and the plain timm trunk carrying exactly its weights (all but ``ood_head``)."""
    ssod = timm.create_model(name).eval()
    trunk = name[len('ssod_'):]
    plain = timm.create_model(trunk).eval()
    state = {k: v for k, v in ssod.state_dict().items() if not k.startswith('ood_head.')}
    plain.load_state_dict(state, strict=True)
    return plain.to(device), ssod.to(device), trunk


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_k(fn: Callable, x: torch.Tensor, k: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``fn(x)``, averaged over ``k`` back-to-back calls."""
    sync()
    t0 = time.perf_counter()
    for _ in range(k):
        fn(x)
    sync()
    return (time.perf_counter() - t0) / k


def interleaved(fns: Dict[str, Callable], x: torch.Tensor, *, repeats: int, min_repeats: int, k: int,
                budget_s: float, sync: Callable[[], None]) -> Dict[str, List[float]]:
    """Per-repetition timings (ms) of each function, order rotated every repetition; stops early past budget_s."""
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(1000 * time_k(fns[n], x, k, sync))
        if r + 1 >= min_repeats and (r + 1) % 2 == 0 and time.perf_counter() - start > budget_s:
            break
    return times


def head_costs(plain, ssod, x: torch.Tensor, sync, min_time: float) -> Dict[str, Dict[str, float]]:
    """What SSOD adds to a forward, measured without the backbone: head paths on a precomputed feature map."""
    features = plain.forward_features(x)
    classifier = ssod.get_classifier()

    def plain_head(f):
        return plain.forward_head(f)

    def ssod_head(f):  # what forward_ssod does after forward_features: one forward_head pass serves both heads
        pooled = ssod.forward_head(f, pre_logits=True)
        return classifier(pooled), ssod.forward_ood(pooled)

    def fused_head(f):  # the earlier two-pass head (forward_head twice), kept for comparison
        logits = ssod.forward_head(f)
        pooled = ssod.forward_head(f, pre_logits=True)
        return logits, ssod.forward_ood(pooled)

    def check_input(_):
        ssod._check_input(x)

    exact = torch.equal(ssod_head(features)[0], plain_head(features))
    fns = {'plain_head': plain_head, 'ssod_head': ssod_head, 'fused_head': fused_head, 'check_input': check_input}
    for fn in fns.values():
        fn(features)
    t1 = max(time_k(ssod_head, features, 3, sync), 1e-6)
    k = max(1, min(2000, math.ceil(min_time / t1)))
    times = interleaved(fns, features, repeats=15, min_repeats=15, k=k, budget_s=float('inf'), sync=sync)
    out = {n: summary(v) for n, v in times.items()}
    out['fused_equals_plain_logits'] = exact
    return out


def bench_case(plain, ssod, batch: int, args, device, sync) -> Dict:
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    ref = plain(x)
    out = ssod(x)
    if not torch.equal(out.logits, ref):
        raise RuntimeError(f'{args.current}: ssod logits differ from the plain model: not the same weights')
    fns = {'plain': plain, 'ssod': ssod}
    warm = args.warmup if batch < 8 else max(1, args.warmup // 3)
    t_first = []
    for i in range(warm):
        for n in (fns if i % 2 == 0 else list(fns)[::-1]):
            t_first.append(time_k(fns[n], x, 1, sync))
    k = max(1, min(100, math.ceil(args.min_time / max(min(t_first[-2:]), 1e-6))))
    times = interleaved(fns, x, repeats=args.repeats, min_repeats=args.min_repeats, k=k,
                        budget_s=args.case_budget, sync=sync)
    plain_s, ssod_s = summary(times['plain']), summary(times['ssod'])
    paired = summary([s / p for p, s in zip(times['plain'], times['ssod'])])
    ci = bootstrap_ratio_ci(times['plain'], times['ssod'])
    head = head_costs(plain, ssod, x, sync, args.min_time / 4)
    overhead_ms = (head['ssod_head']['median'] - head['plain_head']['median'] + head['check_input']['median'])
    fused_overhead_ms = (head['fused_head']['median'] - head['plain_head']['median']
                         + head['check_input']['median'])
    ratio = ssod_s['median'] / plain_s['median']
    return {
        'batch': batch, 'img_size': args.img_size, 'inner_loops': k, 'repeats': plain_s['n'],
        'plain_ms': plain_s, 'ssod_ms': ssod_s, 'ratio': ratio, 'ratio_ci95': ci, 'paired_ratio': paired,
        'goal': GOAL, 'meets_goal': ratio <= GOAL,
        'head_ms': head,
        'ssod_overhead_ms_isolated': overhead_ms,
        'expected_ratio_from_isolated_overhead': 1 + overhead_ms / plain_s['median'],
        'expected_ratio_with_fused_head': 1 + fused_overhead_ms / plain_s['median'],
        'raw_ms': times,
    }


def fmt_ms(v: float) -> str:
    return f'{v:.3f}' if v < 1 else f'{v:.2f}' if v < 100 else f'{v:.0f}'


def write_markdown(path: Path, data: Dict) -> None:
    env, rows, head_rows = data['environment'], [], []
    for r in data['results']:
        goal = 'yes' if r['meets_goal'] else f'no (+{100 * (r["ratio"] - GOAL):.1f} pts)'
        pr, ci = r['paired_ratio'], r['ratio_ci95']
        rows.append([r['model'], r['batch'], fmt_ms(r['plain_ms']['median']), fmt_ms(r['ssod_ms']['median']),
                     f'{r["ratio"]:.3f}', goal, f'{ci[0]:.3f}-{ci[1]:.3f}', r['repeats'],
                     f'{pr["median"]:.3f} ({pr["p25"]:.3f}-{pr["p75"]:.3f})'])
        h = r['head_ms']
        head_rows.append([r['model'], r['batch'], fmt_ms(h['plain_head']['median']), fmt_ms(h['ssod_head']['median']),
                          fmt_ms(h['fused_head']['median']), fmt_ms(h['check_input']['median']),
                          f'{100 * (r["expected_ratio_from_isolated_overhead"] - 1):.2f}%',
                          f'{100 * (r["expected_ratio_with_fused_head"] - 1):.2f}%'])
    dev = data['settings']['device']
    text = [
        f'# Inference: ssod_* vs plain timm model, same weights ({dev})', '',
        f'Median of interleaved repetitions after warm-up, `torch.inference_mode`, eval mode, '
        f'{data["settings"]["img_size"]} px, fp32, torch threads: {env.get("torch_threads")}. '
        f'ratio = median ssod / median plain; goal <= {GOAL}. "95% CI" is a bootstrap interval of that ratio '
        '(repetitions resampled in pairs); "paired ratio" is the median (25-75% range) of the per-repetition '
        'ssod/plain ratios, which shows the noise of a single measurement on this machine.', '',
        markdown_table(['model', 'batch', 'plain ms', 'ssod ms', 'ratio', f'goal <= {GOAL}', '95% CI', 'runs',
                        'paired ratio'], rows), '',
        '## What SSOD adds, isolated', '',
        'The head paths alone on the backbone\'s feature map (ms per call, median of 15 interleaved repetitions): '
        'the plain `forward_head`; SSOD\'s head (`forward_head(pre_logits=True)` once, then the classifier and the '
        'OOD head + sigmoid); the earlier two-pass head (`forward_head` twice); and the input check. '
        '"overhead" is (ssod head - plain head + input check) / plain full forward: the ratio the full-model '
        'timing should show without noise.', '',
        markdown_table(['model', 'batch', 'plain head', 'ssod head', 'two-pass head (before)', 'input check',
                        'overhead', 'overhead two-pass'], head_rows), '',
        environment_markdown(env), '',
    ]
    path.write_text('\n'.join(text))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--device', default='cpu', help='cpu or cuda[:N] (default: cpu)')
    p.add_argument('--models', nargs='+', default=None, help='ssod_* models (default: all but ssod_test_resnet)')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 32])
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=61, help='repetitions per case (at most; see --case-budget)')
    p.add_argument('--min-repeats', type=int, default=4, help='repetitions made whatever the budget')
    p.add_argument('--case-budget', type=float, default=45.0,
                   help='seconds of timed repetitions per (model, batch) after which no new repetition starts')
    p.add_argument('--warmup', type=int, default=3, help='warm-up forwards per model (a third of it from batch 8)')
    p.add_argument('--min-time', type=float, default=0.1, help='seconds one timing should last at least')
    p.add_argument('--threads', type=int, default=1,
                   help='torch intra-op threads, fixed for the run (default 1; see the module docstring)')
    p.add_argument('--quick', action='store_true', help='smoke run: 2 models, batch 1 and 4, few repetitions')
    p.add_argument('--out', type=Path, default=None,
                   help='result stem (default: benchmarks/results/inference_<device>[_quick])')
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or QUICK_MODELS
        if args.batch_sizes == [1, 32]:
            args.batch_sizes = [1, 4]
        args.repeats, args.min_repeats, args.case_budget, args.warmup = 6, 4, 5.0, 2
    args.models = args.models or default_models()
    unknown = [m for m in args.models if not m.startswith('ssod_') or not timm.is_model(m)]
    if unknown:
        p.error(f'not ssod_* models: {unknown}; choose from {timm.list_models("ssod_*")}')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    sync = synchronizer(device)
    extra = {'torch': torch.__version__, 'timm': timm.__version__, 'ssod_zoo': ssod_zoo.__version__,
             'torch_threads': torch.get_num_threads(), 'torch_interop_threads': torch.get_num_interop_threads(),
             'mkldnn': torch.backends.mkldnn.is_available()}
    if device.type == 'cuda':
        extra.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(), tf32_conv=torch.backends.cudnn.allow_tf32,
                     tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    env = environment(**extra)
    stem = args.out or RESULTS / f'inference_{device.type}{"_quick" if args.quick else ""}'
    settings = {k: v for k, v in vars(args).items() if k != 'out'}
    settings['device'] = str(device)
    data = {'environment': env, 'settings': settings, 'results': []}
    t_start = time.perf_counter()
    with torch.inference_mode():
        for name in args.models:
            plain, ssod, trunk = build_pair(name, device)
            for batch in args.batch_sizes:
                args.current = f'{name} batch {batch}'
                gc.collect()
                r = {'model': name, 'plain_model': trunk, **bench_case(plain, ssod, batch, args, device, sync)}
                data['results'].append(r)
                print(f'{name:28s} batch {batch:3d}: plain {fmt_ms(r["plain_ms"]["median"]):>8s} ms  '
                      f'ssod {fmt_ms(r["ssod_ms"]["median"]):>8s} ms  ratio {r["ratio"]:.3f} '
                      f'(95% CI {r["ratio_ci95"][0]:.3f}-{r["ratio_ci95"][1]:.3f}, '
                      f'n={r["repeats"]})  isolated overhead '
                      f'{100 * (r["expected_ratio_from_isolated_overhead"] - 1):.2f}%', flush=True)
            del plain, ssod
    settings.pop('current', None)
    env['load_average_at_end'] = load_average()
    env['wall_time_s'] = round(time.perf_counter() - t_start, 1)
    write_json(stem.with_suffix('.json'), data)
    write_markdown(stem.with_suffix('.md'), data)
    print(f'wrote {stem.with_suffix(".json")} and {stem.with_suffix(".md")} in {env["wall_time_s"]:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
