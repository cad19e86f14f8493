"""ssod_zoo inside timm's own world: auto-registration, timm's model test suite, timm's scripts."""
import json
import os
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

from ssod_zoo.registry import BUILT_IN

from cli_helpers import ASSERT_THIS_CHECKOUT, child_env

HERE = Path(__file__).parent
CACHE = Path(os.environ.get('SSOD_ZOO_TEST_CACHE', Path.home() / '.cache' / 'ssod_zoo_tests'))
PTH_INSTALLED = any((Path(p) / 'ssod_zoo-autoload.pth').exists() for p in site.getsitepackages())
needs_pth = pytest.mark.skipif(
    not PTH_INSTALLED, reason='ssod_zoo-autoload.pth is not in site-packages (editable install?): '
                              'run `pip install .` to test auto-registration')


def _python(code: str, *first: Path, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this checkout's ssod_zoo (PYTHONPATH: ``first``, the checkout)
    and starts from elsewhere, as a user's script does."""
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env=child_env(*first, **env), cwd=HERE.parent.parent)


@needs_pth
def test_fresh_interpreter_needs_no_import():
    r = _python("import timm, torch; m = timm.create_model('ssod_resnet18'); "
                "print(type(m).__name__, m(torch.randn(1, 3, 64, 64)).ood_factor.shape); " + ASSERT_THIS_CHECKOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['SSODResNet', 'torch.Size([1])']


@needs_pth
def test_autoload_costs_no_heavy_import_and_can_be_switched_off():
    r = _python("import sys; print(sorted(m for m in ('torch', 'timm', 'ssod_zoo') if m in sys.modules))")
    assert r.stdout.strip() == '[]', 'python start-up must not import torch, timm or ssod_zoo'
    r = _python("import timm; print(len(timm.list_models('ssod_*')))", SSOD_ZOO_AUTOLOAD='0')
    assert r.returncode == 0 and r.stdout.strip() == '0'


@needs_pth
def test_broken_ssod_zoo_never_breaks_import_timm(tmp_path):
    broken = tmp_path / 'ssod_zoo'
    broken.mkdir()
    (broken / '__init__.py').write_text("raise ImportError('simulated breakage')\n")
    r = _python("import timm; print(timm.create_model('resnet18').__class__.__name__)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'ResNet'
    assert 'ssod_zoo could not register its models' in r.stderr and 'simulated breakage' in r.stderr


def _timm_sdist_tests() -> Path:
    """timm's tests/ from the sdist of the installed version (pip download; cached between runs)."""
    root = CACHE / f'timm-{timm.__version__}'
    if not (root / 'tests' / 'test_models.py').exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, '-m', 'pip', 'download', f'timm=={timm.__version__}', '--no-binary',
                            ':all:', '--no-deps', '-q', '-d', str(CACHE)], capture_output=True, text=True)
        archive = CACHE / f'timm-{timm.__version__}.tar.gz'
        if r.returncode != 0 or not archive.exists():
            pytest.skip(f'could not download the timm {timm.__version__} sdist for its test suite: {r.stderr[-500:]}')
        with tarfile.open(archive) as tar:
            tar.extractall(CACHE, filter='data')
    return root / 'tests'


@pytest.mark.timm_suite
@pytest.mark.timeout(1500)
def test_timm_model_suite_passes_for_every_ssod_model(tmp_path):
    """timm's own tests/test_models.py, unchanged, on every ssod_* model in return_ood=False mode.

    Excluded: test_model_backward, which demands a gradient for every parameter from the logits alone; the
    OOD head gets none from them by design (test_ssod_models.py checks both outputs reach every parameter).
    """
    tests = _timm_sdist_tests()
    report = tmp_path / 'report.json'
    r = subprocess.run(
        [sys.executable, '-m', 'pytest', str(tests / 'test_models.py'), '-p', 'timm_suite_plugin',
         '-k', 'ssod_ and not test_model_backward', '-q', '-p', 'no:cacheprovider', '--timeout', '900',
         f'--junitxml={report}'],
        capture_output=True, text=True, cwd=tests.parent, env=child_env(HERE))  # the plugin, this checkout
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]
    print('timm suite:', summary)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert ' passed' in summary and 'failed' not in summary
    # every model registered on import went through the suite (not those a test registered in this process)
    tested = report.read_text()
    for name in BUILT_IN:
        assert f'[1-{name}]' in tested, f'{name} was not exercised by the timm suite'


TIMM_SCRIPTS = os.environ.get('TIMM_SCRIPTS_DIR')


@pytest.mark.skipif(not TIMM_SCRIPTS, reason='set TIMM_SCRIPTS_DIR to a timm repository checkout (validate.py and '
                                             'inference.py are not in the timm sdist or wheel)')
@needs_pth  # the scripts run in a fresh interpreter that knows ssod_* only through the .pth
@pytest.mark.parametrize('script', ['validate.py', 'inference.py'])
def test_timm_scripts_run_unchanged(tmp_path, script):
    import torch
    from PIL import Image
    for c, colour in (('cat', (200, 30, 30)), ('dog', (30, 30, 200))):
        (tmp_path / 'data' / c).mkdir(parents=True)
        for i in range(3):
            Image.new('RGB', (72, 72), colour).save(tmp_path / 'data' / c / f'{c}{i}.png')
    model = timm.create_model('ssod_resnet18', num_classes=2).eval()
    # a classifier that tells the two colours apart, so validate.py's top-1 of 100% means the logits were read
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.no_grad():
        red, blue = model.forward_head(model.forward_features(torch.stack([
            transform(Image.open(tmp_path / 'data' / c / f'{c}0.png').convert('RGB')) for c in ('cat', 'dog')])),
            pre_logits=True)
        direction = (red - blue) / (red - blue).norm() ** 2
        model.fc.weight.copy_(torch.stack([direction, -direction]))
        model.fc.bias.copy_(torch.stack([-direction @ (red + blue) / 2, direction @ (red + blue) / 2]))
        assert model(torch.stack([transform(Image.open(tmp_path / 'data' / c / f'{c}1.png').convert('RGB'))
                                  for c in ('cat', 'dog')])).logits.argmax(1).tolist() == [0, 1]
    torch.save(model.state_dict(), tmp_path / 'ckpt.pth')
    args = [sys.executable, str(Path(TIMM_SCRIPTS) / script), str(tmp_path / 'data'), '--model', 'ssod_resnet18',
            '--model-kwargs', 'return_ood=False', '--num-classes', '2', '--checkpoint', str(tmp_path / 'ckpt.pth'),
            '-b', '2', '--workers', '0', '--device', 'cpu']
    if script == 'validate.py':
        args += ['--results-file', str(tmp_path / 'results.json'), '--results-format', 'json']
    else:
        args += ['--results-dir', str(tmp_path / 'out'), '--topk', '1']
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if script == 'validate.py':
        result = json.loads((tmp_path / 'results.json').read_text())
        assert result['model'] == 'ssod_resnet18' and result['top1'] == pytest.approx(100.0)
    else:
        rows = (tmp_path / 'out' / 'ssod_resnet18-224.csv').read_text().strip().splitlines()
        assert len(rows) == 1 + 6  # header + one row per image
