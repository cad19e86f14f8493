"""Training-step cost: the SSOD objective against plain cross-entropy, same timm model, batch and resolution.

One step = forward + loss + backward + AdamW step. "ce" runs the plain timm model's forward and
``F.cross_entropy``; "ssod" runs ``forward_spatial`` (the per-position heads) and :class:`ssod_zoo.loss.SSODLoss`
(sampler + LWB). Both use the same weights and inputs; repetitions are interleaved (ce, ssod, ce, ssod, ...)
so that machine noise hits both alike, and the ratio of medians is reported with a bootstrap interval.
Goal (training issue): ratio <= 1.10.

    python benchmarks/bench_train_step.py                       # CPU, the default set of models
    python benchmarks/bench_train_step.py --device cuda --amp bf16
"""
import argparse
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import ssod_zoo  # noqa: E402,F401
from ssod_zoo.loss import SSODLoss  # noqa: E402

GOAL = 1.10


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bench(name: str, batch: int, size: int, num_classes: int, repeats: int, warmup: int, device: torch.device,
          amp: str) -> dict:
    torch.manual_seed(0)
    ssod = timm.create_model(name, num_classes=num_classes).to(device).train()
    plain = timm.create_model(name[len('ssod_'):], num_classes=num_classes).to(device).train()
    plain.load_state_dict({k: v for k, v in ssod.state_dict().items() if not k.startswith('ood_head.')})
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    criterion = SSODLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == 'bf16')
    opts = {'ce': torch.optim.AdamW(plain.parameters(), lr=1e-6), 'ssod': torch.optim.AdamW(ssod.parameters(), lr=1e-6)}

    def step(kind: str) -> float:
        _sync(device)
        t = time.perf_counter()
        with autocast:
            if kind == 'ce':
                loss = F.cross_entropy(plain(x).float(), y)
            else:
                loss = criterion(ssod.forward_spatial(x), y).loss
        opts[kind].zero_grad(set_to_none=True)
        loss.backward()
        opts[kind].step()
        _sync(device)
        return time.perf_counter() - t

    for _ in range(warmup):
        step('ce'), step('ssod')
    times = {'ce': [], 'ssod': []}
    for i in range(repeats):
        for kind in (('ce', 'ssod') if i % 2 == 0 else ('ssod', 'ce')):
            times[kind].append(step(kind))
    ce, ss = _common.summary(times['ce']), _common.summary(times['ssod'])
    return {'model': name, 'batch': batch, 'size': size, 'num_classes': num_classes,
            'ce_ms': 1000 * ce['median'], 'ssod_ms': 1000 * ss['median'], 'ratio': ss['median'] / ce['median'],
            'ratio_ci95': _common.bootstrap_ratio_ci(times['ce'], times['ssod']), 'repeats': repeats,
            'ce': ce, 'ssod': ss}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['ssod_resnet18', 'ssod_resnet50', 'ssod_mobilenetv3_large_100'])
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--num-classes', type=int, default=1000, help='1000 (ImageNet) is the costliest head')
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', choices=('none', 'bf16'), default='none')
    p.add_argument('--threads', type=int, default=0, help='torch threads on CPU (0: torch default)')
    p.add_argument('--out', type=Path, default=None,
                   help='output path without suffix (default: results/train_step_<device>[_bf16])')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = _common.environment(torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads(),
                              device=str(device), amp=args.amp)
    rows = []
    for name in args.models:
        r = bench(name, args.batch, args.size, args.num_classes, args.repeats, args.warmup, device, args.amp)
        rows.append(r)
        print(f'{name}: ce {r["ce_ms"]:.0f} ms, ssod {r["ssod_ms"]:.0f} ms, ratio {r["ratio"]:.3f} '
              f'(95% CI {r["ratio_ci95"][0]:.3f}-{r["ratio_ci95"][1]:.3f})', flush=True)
    tag = device.type + ('_bf16' if args.amp == 'bf16' else '')
    result = {'goal_ratio': GOAL, 'environment': env, 'results': rows}
    out = args.out or _common.RESULTS / f'train_step_{tag}'
    _common.write_json(out.with_suffix('.json'), result)
    table = _common.markdown_table(
        ['model', 'batch', 'px', 'classes', 'CE step ms', 'SSOD step ms', 'ratio', '95% CI', f'goal <= {GOAL}'],
        [[r['model'], r['batch'], r['size'], r['num_classes'], f'{r["ce_ms"]:.0f}', f'{r["ssod_ms"]:.0f}',
          f'{r["ratio"]:.3f}', f'{r["ratio_ci95"][0]:.3f}-{r["ratio_ci95"][1]:.3f}',
          'yes' if r['ratio'] <= GOAL else f'no (+{100 * (r["ratio"] - GOAL):.1f} pts)'] for r in rows])
    out.with_suffix('.md').write_text(
        f'# Training step: SSOD objective vs plain cross-entropy ({tag})\n\n'
        'forward + loss + backward + AdamW step, median of interleaved repetitions after warm-up; '
        f'ratio = SSOD / CE.\n\n{table}\n\n{_common.environment_markdown(env)}\n')
    return result


if __name__ == '__main__':
    main()
