"""Does a resumed run repeat an uninterrupted one, bit for bit, on this device?

On CPU the recipe's tests say yes (tests/test_train.py). On CUDA, cuDNN's default convolution backward kernels
are not deterministic, so two runs of the same command can already differ. Per setting (the recipe's defaults,
then ``--deterministic``), three runs of the recipe on a tiny synthetic benchmark: two uninterrupted 2-epoch runs
and one stopped after epoch 1 and resumed. Reported: the largest absolute weight difference of each pair. Each
run is its own ``python -m ssod_zoo.app.train`` process, as a user runs it, so that cuBLAS starts after
``--deterministic`` has fixed its workspace. On CPU one more run, with one intra-op thread
(``OMP_NUM_THREADS=1``), against the first uninterrupted run at the machine's default thread count: a resumed run
repeats the one it continues only with the same thread count.

    python benchmarks/resume_determinism.py --device cuda
    python benchmarks/resume_determinism.py --device cpu
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from ssod_zoo.app.synthetic import BenchmarkConfig, SyntheticBenchmark  # noqa: E402


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = (torch.load(p / 'last.pt', map_location='cpu', weights_only=True)['model'] for p in (a, b))
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out', type=Path, default=None,
                   help='output path without suffix (default: results/resume_determinism_<device>)')
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = BenchmarkConfig(num_classes=3, image_size=64, train_per_class=16, val_per_class=8, ood_per_set=8)
        bench = SyntheticBenchmark(tmp / 'bench', config).prepare(workers=1, progress=False).root

        def run(out: Path, *extra: str, env: Optional[dict] = None) -> None:
            subprocess.run([sys.executable, '-m', 'ssod_zoo.app.train', '--model', 'ssod_test_resnet',
                            '--model-kwargs', 'output_stride=16', '--data', 'folder',
                            '--train-dir', str(bench / 'id' / 'train'), '--val-dir', str(bench / 'id' / 'val'),
                            '--img-size', '64', '--crop-pct', '1.0', '--batch-size', '8', '--lr', '1e-3',
                            '--workers', '0', '--eval-every', '0', '--device', args.device, '--no-progress',
                            '--out-dir', str(out), *extra], check=True, env=env)

        for flags in ([], ['--deterministic']):
            name = ' '.join(flags) or 'defaults'
            a, b, split = (tmp / f'{"deterministic" if flags else "defaults"}-{run_}' for run_ in 'ab' + 's')
            run(a, '--epochs', '2', *flags)
            run(b, '--epochs', '2', *flags)
            run(split, '--epochs', '1', *flags)
            run(split, '--epochs', '2', '--resume', 'auto', *flags)
            rows.append({'setting': name, 'uninterrupted_vs_uninterrupted': _max_diff(a, b),
                         'uninterrupted_vs_resumed': _max_diff(a, split)})
            print(f'{name}: max |w_a - w_b| {rows[-1]["uninterrupted_vs_uninterrupted"]:.2e}, '
                  f'max |w_a - w_resumed| {rows[-1]["uninterrupted_vs_resumed"]:.2e}', flush=True)
            if torch.device(args.device).type == 'cpu' and not flags:
                one = tmp / 'defaults-1thread'
                run(one, '--epochs', '2', env={**os.environ, 'OMP_NUM_THREADS': '1'})
                threads = torch.get_num_threads()
                rows.append({'setting': f'defaults, 1 thread against {threads}', 'threads': [1, threads],
                             'uninterrupted_vs_uninterrupted': _max_diff(a, one)})
                print(f'{rows[-1]["setting"]}: max |w_a - w_b| {rows[-1]["uninterrupted_vs_uninterrupted"]:.2e}',
                      flush=True)
    env = _common.environment(torch=torch.__version__, device=args.device,
                              gpu=torch.cuda.get_device_name() if args.device.startswith('cuda') else None)
    result = {'environment': env, 'results': rows}
    out = args.out or _common.RESULTS / f'resume_determinism_{torch.device(args.device).type}'
    _common.write_json(out.with_suffix('.json'), result)
    table = _common.markdown_table(
        ['setting', 'two uninterrupted runs', 'uninterrupted against resumed'],
        [[r['setting'], f'{r["uninterrupted_vs_uninterrupted"]:.2e}',
          f'{r["uninterrupted_vs_resumed"]:.2e}' if 'uninterrupted_vs_resumed' in r else '']
         for r in rows])
    out.with_suffix('.md').write_text(
        f'# Resume determinism ({args.device})\n\nThe recipe on a tiny synthetic benchmark, 2 epochs of 6 steps; '
        'largest absolute difference over all weights between two runs; 0 means bit for bit.\n\n'
        f'{table}\n\n{_common.environment_markdown(env)}\n')
    return result


if __name__ == '__main__':
    main()
