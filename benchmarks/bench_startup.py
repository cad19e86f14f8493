"""What ssod_zoo's auto-registration adds to interpreter start-up (issue 6, benchmark 4).

``ssod_zoo-autoload.pth`` in site-packages runs ``import _ssod_zoo_autoload`` in every interpreter; that module
puts a finder on ``sys.meta_path`` which imports ssod_zoo right after timm. Two costs follow:

- ``python -c pass``: the .pth line, the import of ``_ssod_zoo_autoload`` and the finder (goal: < 5 ms);
- ``python -c "import timm"``: additionally importing ssod_zoo and registering the models.

Method: each round runs every variant once as a fresh subprocess (``SSOD_ZOO_AUTOLOAD=0`` and ``=1``), in an
order that alternates between rounds, from a neutral working directory; reported are the medians, the spread,
and the median of the per-round differences. ``SSOD_ZOO_AUTOLOAD=0`` still imports ``_ssod_zoo_autoload``
(the module reads the variable), so the 0/1 difference misses that import: ``-X importtime`` measures it
separately and the added cost for ``-c pass`` is the sum of both. For ``import timm`` (seconds of torch import,
with a spread of a hundred milliseconds) the wall-time difference cannot resolve a few milliseconds, so the
added cost is the in-process ``-X importtime`` of ``_ssod_zoo_autoload`` plus ``ssod_zoo``; the wall-time
difference is kept as a cross-check. The module list that the registration brings into ``import timm`` is
recorded too.

Usage::

    python benchmarks/bench_startup.py [--rounds 60] [--timm-rounds 25]
"""
import argparse
import os
import re
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, environment, environment_markdown, load_average, markdown_table,  # noqa: E402
                     summary, write_json)

PTH = 'ssod_zoo-autoload.pth'
GOAL_PASS_MS = 5.0
SCENARIOS = {'pass': 'pass', 'import timm': 'import timm'}
IMPORTTIME_MODULES = {
    'pass': ['_ssod_zoo_autoload'],
    'import timm': ['_ssod_zoo_autoload', 'timm', 'ssod_zoo', 'ssod_zoo.adapter', 'ssod_zoo.output',
                    'ssod_zoo.registry', 'ssod_zoo.hub'],
}


def find_pth() -> Dict:
    """Where the interpreter's site-packages are and whether the autoload .pth is among them."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    found = [str(Path(d) / PTH) for d in dirs if (Path(d) / PTH).is_file()]
    info = {'site_packages': dirs, 'pth_files': found, 'pth_found': bool(found)}
    if found:
        info['pth_content'] = Path(found[0]).read_text().strip()
    return info


_CHILD_ENV: Dict[str, str] = dict(os.environ)


def run(code: str, autoload: str, cwd: str,
        extra_args: Tuple[str, ...] = ()) -> Tuple[float, subprocess.CompletedProcess]:
    env = dict(_CHILD_ENV, SSOD_ZOO_AUTOLOAD=autoload)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *extra_args, '-c', code], cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f'python -c {code!r} (SSOD_ZOO_AUTOLOAD={autoload}) failed:\n{proc.stderr}')
    return 1000 * dt, proc


def interleaved(code: str, rounds: int, cwd: str) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {'0': [], '1': []}
    for r in range(rounds):
        for autoload in (('0', '1') if r % 2 == 0 else ('1', '0')):
            times[autoload].append(run(code, autoload, cwd)[0])
    return times


_IMPORTTIME = re.compile(r'import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)')


def import_times(code: str, autoload: str, cwd: str, runs: int, modules: List[str]) -> Dict[str, Dict]:
    """Median self and cumulative ``-X importtime`` microseconds of the named modules over ``runs`` runs."""
    seen: Dict[str, Dict[str, List[int]]] = {m: {'self_us': [], 'cumulative_us': []} for m in modules}
    for _ in range(runs):
        _, proc = run(code, autoload, cwd, ('-X', 'importtime'))
        for line in proc.stderr.splitlines():
            m = _IMPORTTIME.match(line)
            if m and m.group(4) in seen:
                seen[m.group(4)]['self_us'].append(int(m.group(1)))
                seen[m.group(4)]['cumulative_us'].append(int(m.group(2)))
    return {m: {k: statistics.median(v) if v else None for k, v in d.items()} for m, d in seen.items()}


def new_modules(cwd: str) -> List[str]:
    """Top-level modules that ``import timm`` loads only when the registration runs."""
    code = 'import sys, timm; print("\\n".join(sorted({m.split(".")[0] for m in sys.modules})))'
    off = set(run(code, '0', cwd)[1].stdout.split())
    on = set(run(code, '1', cwd)[1].stdout.split())
    return sorted(on - off)


def check_switch(cwd: str) -> Dict[str, int]:
    code = 'import timm; print(len(timm.list_models("ssod_*")))'
    return {f'SSOD_ZOO_AUTOLOAD={a}': int(run(code, a, cwd)[1].stdout.strip()) for a in ('0', '1')}


def fmt(s: Dict[str, float]) -> str:
    return f'{s["median"]:.2f} ({s["p25"]:.2f}-{s["p75"]:.2f})'


def write_markdown(path: Path, data: Dict) -> None:
    rows = []
    for name, r in data['scenarios'].items():
        goal = ''
        if name == 'pass':
            goal = f'{"yes" if r["added_ms"] < GOAL_PASS_MS else "no"} (< {GOAL_PASS_MS:g} ms)'
        rows.append([f'`python -c "{SCENARIOS[name]}"`', fmt(r['autoload_0_ms']), fmt(r['autoload_1_ms']),
                     fmt(r['paired_diff_ms']), f'{r["autoload_module_import_ms"]:.3f}', f'{r["added_ms"]:.2f}',
                     r['added_method'], goal or 'none set', r['rounds']])
    it = data['importtime']
    it_rows = [[f'`{m}`', v['self_us'], v['cumulative_us']] for m, v in it.items() if v['self_us'] is not None]
    pth = data['autoload_pth']
    text = [
        '# Start-up cost of the timm auto-registration', '',
        f'Wall time of fresh `{Path(sys.executable).name} -c ...` subprocesses, milliseconds: median (25-75%). '
        'Each round runs both settings, alternating which goes first. "1 - 0" is the median of the per-round '
        'differences; "autoload import" is `-X importtime` of `_ssod_zoo_autoload` (paid with either setting, '
        'so not in "1 - 0"); "added" is what the registration costs, estimated as the row says.', '',
        markdown_table(['command', 'SSOD_ZOO_AUTOLOAD=0', 'SSOD_ZOO_AUTOLOAD=1', '1 - 0', 'autoload import',
                        'added', 'added, from', 'goal', 'rounds'], rows), '',
        '`-X importtime` (microseconds, median over runs; `import timm` with SSOD_ZOO_AUTOLOAD=1):', '',
        markdown_table(['module', 'self us', 'cumulative us'], it_rows), '',
        f'Top-level modules that `import timm` loads only with the registration: '
        f'{", ".join(f"`{m}`" for m in data["modules_added_to_import_timm"]) or "none"}.', '',
        f'Switch check (ssod_* models registered after `import timm`): {data["switch_check"]}.', '',
        f'Autoload .pth: {"found: " + ", ".join(pth["pth_files"]) if pth["pth_found"] else "NOT FOUND in "}'
        f'{"" if pth["pth_found"] else ", ".join(pth["site_packages"]) + " (the figures above then mean nothing)"}'
        f'{"; content: `" + pth["pth_content"] + "`" if pth.get("pth_content") else ""}.', '',
        environment_markdown(data['environment']), '',
    ]
    path.write_text('\n'.join(text))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rounds', type=int, default=60, help='rounds of `python -c pass` (each runs 0 and 1)')
    p.add_argument('--timm-rounds', type=int, default=25, help='rounds of `python -c "import timm"`')
    p.add_argument('--importtime-runs', type=int, default=15, help='runs of -X importtime per command')
    p.add_argument('--warmup', type=int, default=3, help='untimed runs of each command first (pyc, page cache)')
    p.add_argument('--no-bytecode-cache', action='store_true',
                   help='keep PYTHONDONTWRITEBYTECODE from the environment (default: the children may cache '
                        'bytecode, as a normal install does; without it every start compiles ssod_zoo from source)')
    p.add_argument('--out', type=Path, default=RESULTS / 'startup', help='result stem (.json and .md)')
    args = p.parse_args(argv)
    if not args.no_bytecode_cache:
        _CHILD_ENV.pop('PYTHONDONTWRITEBYTECODE', None)

    pth = find_pth()
    if not pth['pth_found']:
        print(f'WARNING: {PTH} is not in {pth["site_packages"]}: the auto-registration never runs, so these '
              'figures measure nothing; install the package (pip install -e . or a wheel)', file=sys.stderr)
    import timm
    import torch
    env = environment(torch=torch.__version__, timm=timm.__version__, python_executable=sys.executable,
                      children_PYTHONDONTWRITEBYTECODE=_CHILD_ENV.get('PYTHONDONTWRITEBYTECODE', '(unset)'))
    t_start = time.perf_counter()
    data = {'environment': env, 'settings': vars(args) | {'out': str(args.out)}, 'autoload_pth': pth,
            'scenarios': {}}
    with tempfile.TemporaryDirectory() as cwd:  # neutral cwd: '' on sys.path must not find the repo
        data['switch_check'] = check_switch(cwd)
        for name, rounds in (('pass', args.rounds), ('import timm', args.timm_rounds)):
            code = SCENARIOS[name]
            for _ in range(args.warmup):
                run(code, '0', cwd), run(code, '1', cwd)
            times = interleaved(code, rounds, cwd)
            imports = import_times(code, '1', cwd, args.importtime_runs, IMPORTTIME_MODULES[name])
            diff = summary([b - a for a, b in zip(times['0'], times['1'])])
            autoload_ms = (imports['_ssod_zoo_autoload']['cumulative_us'] or 0) / 1000
            if name == 'pass':
                # nothing but the .pth runs: the wall-time difference resolves the finder, importtime the module
                added, method = diff['median'] + autoload_ms, '1 - 0 + autoload import'
            else:
                # a few ms cannot be resolved in a multi-second process with 100 ms spread; in-process import time can
                added = autoload_ms + (imports['ssod_zoo']['cumulative_us'] or 0) / 1000
                method = 'autoload import + ssod_zoo import (-X importtime); 1 - 0 is below this noise'
            data['scenarios'][name] = {
                'rounds': rounds, 'autoload_0_ms': summary(times['0']), 'autoload_1_ms': summary(times['1']),
                'paired_diff_ms': diff, 'autoload_module_import_ms': autoload_ms, 'importtime_us': imports,
                'added_ms': added, 'added_method': method, 'raw_ms': times,
            }
            print(f'python -c {code!r}: 0 -> {fmt(summary(times["0"]))} ms, 1 -> {fmt(summary(times["1"]))} ms, '
                  f'1-0 {fmt(diff)} ms, added {added:.2f} ms ({method})', flush=True)
        data['importtime'] = data['scenarios']['import timm']['importtime_us']
        data['modules_added_to_import_timm'] = new_modules(cwd)
    env['load_average_at_end'] = load_average()
    env['wall_time_s'] = round(time.perf_counter() - t_start, 1)
    write_json(args.out.with_suffix('.json'), data)
    write_markdown(args.out.with_suffix('.md'), data)
    print(f'wrote {args.out.with_suffix(".json")} and {args.out.with_suffix(".md")}')
    return 0 if pth['pth_found'] else 1


if __name__ == '__main__':
    sys.exit(main())
