"""Scoring at scale: KNN, Mahalanobis and ViM with a feature bank of 100k x 2048.

For each detector: the fit time on the bank, then for growing numbers of test images the scoring time and the
peak extra memory (resident memory sampled every 2 ms on CPU, ``max_memory_allocated`` on CUDA, above what
was in use before the call). Time should grow linearly with the number of test images, and memory should stay
bounded by the chunk size, not grow with the bank or the test set.

    python benchmarks/bench_scores.py                     # 100k x 2048 bank, 1k/2k/4k test images, CPU
    python benchmarks/bench_scores.py --device cuda --tests 10000 20000 40000
"""
import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from ssod_zoo.scores import KNN, Mahalanobis, ViM  # noqa: E402


class PeakMemory:
    """Peak extra memory during a block: RSS sampled on CPU, the allocator's peak on CUDA (bytes)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--bank', type=int, default=100_000)
    p.add_argument('--dim', type=int, default=2048)
    p.add_argument('--classes', type=int, default=1000)
    p.add_argument('--tests', type=int, nargs='+', default=[1000, 2000, 4000])
    p.add_argument('--chunk-size', type=int, default=4096)
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    # ReLU-like, class-structured features, as a CNN's pooled features are
    centres = torch.randn(args.classes, args.dim, generator=g)
    labels = torch.randint(0, args.classes, (args.bank,), generator=g)
    bank = (centres[labels] + torch.randn(args.bank, args.dim, generator=g)).relu_().to(device)
    weight = (0.01 * torch.randn(args.classes, args.dim, generator=g)).to(device)
    bias = torch.zeros(args.classes, device=device)
    tests = (centres[torch.randint(0, args.classes, (max(args.tests),), generator=g)]
             + torch.randn(max(args.tests), args.dim, generator=g)).relu_().to(device)
    env = _common.environment(torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                              bank=[args.bank, args.dim], chunk_size=args.chunk_size)

    detectors = {
        'knn': (KNN(k=50, chunk_size=args.chunk_size), lambda d: d.fit(bank), lambda d, x: d(x)),
        'mahalanobis': (Mahalanobis(chunk_size=args.chunk_size), lambda d: d.fit(bank, labels.to(device)),
                        lambda d, x: d(x)),
        'vim': (ViM(chunk_size=args.chunk_size), lambda d: d.fit(bank, weight, bias),
                lambda d, x: d(x, x @ weight.T + bias)),
    }
    rows = []
    for name, (det, fit, score) in detectors.items():
        t = time.perf_counter()
        with PeakMemory(device) as mem:
            fit(det)
        fit_s, fit_mem = time.perf_counter() - t, mem.peak
        for n in args.tests:
            x = tests[:n]
            t = time.perf_counter()
            with PeakMemory(device) as mem:
                score(det, x)
            rows.append({'detector': name, 'bank': args.bank, 'dim': args.dim, 'test_images': n,
                         'fit_s': fit_s, 'fit_peak_mb': fit_mem / 2**20, 'score_s': time.perf_counter() - t,
                         'score_peak_mb': mem.peak / 2**20})
            r = rows[-1]
            print(f'{name}: fit {fit_s:.1f} s; {n} test images: {r["score_s"]:.2f} s, '
                  f'peak +{r["score_peak_mb"]:.0f} MB', flush=True)
        del det
    for r in rows:  # linearity: time per image relative to the smallest test set
        base = next(b for b in rows if b['detector'] == r['detector'] and b['test_images'] == min(args.tests))
        r['time_per_image_vs_smallest'] = (r['score_s'] / r['test_images']) / (base['score_s'] / base['test_images'])

    result = {'environment': env, 'results': rows}
    _common.write_json(_common.RESULTS / f'scores_{device.type}.json', result)
    table = _common.markdown_table(
        ['detector', 'bank', 'test images', 'fit s', 'score s', 'time/image vs smallest', 'score peak MB'],
        [[r['detector'], f'{r["bank"]}x{r["dim"]}', r['test_images'], f'{r["fit_s"]:.1f}', f'{r["score_s"]:.2f}',
          f'{r["time_per_image_vs_smallest"]:.2f}', f'{r["score_peak_mb"]:.0f}'] for r in rows])
    (_common.RESULTS / f'scores_{device.type}.md').write_text(
        f'# Scoring at scale ({device.type})\n\nFeature bank {args.bank} x {args.dim}, chunk size {args.chunk_size}. '
        'Linear time = "time/image vs smallest" near 1; bounded memory = "score peak MB" flat as the test set '
        f'grows (the bank itself is {args.bank * args.dim * 4 / 2**20:.0f} MB and not counted).\n\n{table}\n\n'
        f'{_common.environment_markdown(env)}\n')
    return result


if __name__ == '__main__':
    main()
