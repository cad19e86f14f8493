"""The repository's promises about itself: the README's two commands, CI, the `ssod` CLI."""
import ast
import subprocess
import sys

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands():
    readme = (ROOT / 'README.md').read_text()
    block = readme.split('## Set up', 1)[1].split('```bash', 1)[1].split('```', 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith('#')]


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = _setup_commands()
    assert main_job.startswith('pip install ') and 'ssod demo' in main_job
    assert tests.startswith('pip install ') and 'pytest' in tests
    ci = (ROOT / '.ci' / 'run').read_text()
    assert tests in ci.splitlines()


def test_top_level_layout():
    for name in ('ssod_zoo', 'weights', 'benchmarks', 'tests', 'setup.cfg', 'pyproject.toml', 'MODEL_CARD.md',
                 'README.md', '.ci/run'):
        assert (ROOT / name).exists(), name


def test_library_imports_only_its_declared_dependencies():
    """adapter/registry/output/loss/scores/metrics/hub/export import only torch, timm, torchvision, HF, safetensors."""
    allowed = {'torch', 'timm', 'torchvision', 'huggingface_hub', 'safetensors', 'onnx', 'onnxscript', 'onnxruntime'}
    stdlib = set(sys.stdlib_module_names)
    library = ['adapter', 'registry', 'output', 'loss', 'scores', 'metrics', 'hub', 'export']
    library += [f'detectors/{p.stem}' for p in sorted((ROOT / 'ssod_zoo' / 'detectors').glob('*.py'))]
    for name in library:
        tree = ast.parse((ROOT / 'ssod_zoo' / f'{name}.py').read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split('.')[0]
                assert top in allowed or top in stdlib, f'ssod_zoo/{name}.py imports {module}'


def test_cli_lists_its_commands_and_rejects_unknown_ones(capsys):
    import ssod_zoo
    import timm
    from ssod_zoo.app import cli
    # the module runs as a program (one process: each costs seconds of imports)
    r = subprocess.run([sys.executable, '-m', 'ssod_zoo.app.cli', '--version'], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f'ssod_zoo {ssod_zoo.__version__} (timm {timm.__version__}')
    with pytest.raises(SystemExit) as e:
        cli.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ('demo', 'train', 'eval', 'export', 'save', 'push'):
        assert f'  {command}' in out
    with pytest.raises(SystemExit) as e:
        cli.main(['fly'])
    assert e.value.code == 2 and 'unknown command' in capsys.readouterr().err


def test_import_ssod_zoo_loads_no_training_dependency():
    """The library adds no module beyond what timm, huggingface_hub and safetensors load (tqdm and PIL come with
    those: huggingface_hub and torchvision require them); matplotlib, sklearn and the app stay out."""
    code = ('import sys; import timm, huggingface_hub, safetensors.torch; before = set(sys.modules)\n'
            'import ssod_zoo, ssod_zoo.export\n'  # every library module; the export's command is the app's
            'allowed = {"ssod_zoo", "_ssod_zoo_autoload", "torch", "timm", "torchvision", "huggingface_hub", '
            '"safetensors", *sys.stdlib_module_names}\n'
            'print(sorted({m.split(".")[0] for m in set(sys.modules) - before} - allowed), '
            '[m for m in ("matplotlib", "sklearn", "ssod_zoo.app") if m in sys.modules])')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '[] []'


@pytest.mark.parametrize('command, blocked, extra', [('demo', 'matplotlib', 'train'), ('eval', 'matplotlib', 'train'),
                                                     ('export', 'onnx', 'export')])
def test_commands_without_their_extra_name_it_in_one_line(command, blocked, extra, tmp_path):
    """A plain `pip install` has no matplotlib, and the [train] one no onnx: say which extra to install, in one
    line, without a traceback (the demo and eval before any work starts)."""
    args = ['--out', str(tmp_path / 'o')]
    if command == 'export':
        args = ['ssod_test_resnet', '--out', str(tmp_path / 'o.onnx')]
    code = (f'import sys; sys.modules[{blocked!r}] = None\n'
            'from ssod_zoo.app.cli import main\n'
            f'main([{command!r}, *{args!r}])')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    # the command's own lines (export first notes that the named model's weights are untrained); a library's
    # warning at import may come too, and is not the command's to hide
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith(('ssod ', 'note: '))]
    assert lines[-1] == (
        f"ssod {command}: error: needs {blocked}, which is in the [{extra}] extra: pip install 'ssod_zoo[{extra}]'")
    assert len(lines) == (2 if command == 'export' else 1) and 'Traceback' not in r.stderr
    assert not (tmp_path / 'o').exists()
