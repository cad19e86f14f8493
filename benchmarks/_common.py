"""Shared plumbing for the benchmarks: environment record, robust statistics, result files."""
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Sequence

RESULTS = Path(__file__).resolve().parent / 'results'
REPO = Path(__file__).resolve().parent.parent


def command_line() -> str:
    """The command that produced a result, as one would type it from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return shlex.join(['python', script, *sys.argv[1:]])


def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + (' (uncommitted changes)' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def environment(**extra: Any) -> Dict[str, Any]:
    env = {
        'date_utc': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S'),
        'command': command_line(),
        'git_commit': git_commit(),
        'python': platform.python_version(),
        'platform': platform.platform(),
        'cpu_model': cpu_model(),
        'cpu_count': os.cpu_count(),
        'load_average_at_start': load_average(),
    }
    env.update(extra)
    return env


def summary(values: Sequence[float]) -> Dict[str, float]:
    """Median and spread of repeated timings (seconds or ms, whatever was passed)."""
    values = sorted(values)
    n = len(values)
    q = statistics.quantiles(values, n=4, method='inclusive') if n >= 2 else [values[0]] * 3
    return {'median': statistics.median(values), 'p25': q[0], 'p75': q[2], 'min': values[0], 'max': values[-1],
            'n': n}


def mean_sd(values: Sequence[float]) -> str:
    """'mean ± sample sd' to one decimal, or just the value for one run."""
    m = sum(values) / len(values)
    if len(values) == 1:
        return f'{m:.1f}'
    return f'{m:.1f} ± {(sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5:.1f}'


def save_figure(fig, path: Path) -> None:
    """Lay out, write (120 dpi, trimmed to what is drawn, a legend outside the axes included) and close ``fig``."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + '\n')


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def environment_markdown(env: Dict[str, Any]) -> str:
    lines = ['Command (from the repository root):', '', '```', env['command'], '```', '', 'Environment:', '']
    lines += [f'- {k}: {v}' for k, v in env.items() if k != 'command']
    return '\n'.join(lines)


def bootstrap_ratio_ci(base: Sequence[float], other: Sequence[float], n: int = 2000, seed: int = 0,
                       level: float = 0.95) -> List[float]:
    """Confidence interval of median(other) / median(base), resampling the repetitions in pairs."""
    import random

    rng = random.Random(seed)
    pairs = list(zip(base, other))
    ratios = []
    for _ in range(n):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        ratios.append(statistics.median(o for _, o in sample) / statistics.median(b for b, _ in sample))
    ratios.sort()
    lo = ratios[int((1 - level) / 2 * n)]
    hi = ratios[min(n - 1, int((1 + level) / 2 * n))]
    return [lo, hi]
