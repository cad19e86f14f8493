"""The weights shipped in weights/: they load offline with pretrained=True and reproduce their manifest's metrics."""
import json
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader

from ssod_zoo.app.evaluate import collect, ssod_report
from ssod_zoo.app.synthetic import BenchmarkConfig, SyntheticBenchmark

MANIFEST = json.loads((Path(__file__).resolve().parent.parent / 'weights' / 'manifest.json').read_text())
# weights measured on a named real-data protocol are reproduced by tests/test_protocols.py
SYNTHETIC = [e for e in MANIFEST['weights'] if e['file'] and e['metrics'].get('ood') and not e['metrics'].get('protocol')]


def test_at_least_one_weight_with_metrics_is_shipped():
    # (that every entry is registered: test_hub.py::test_registered_tags_are_exactly_the_manifest)
    assert SYNTHETIC, 'weights/manifest.json lists no shipped weight with measured metrics'


@pytest.mark.parametrize('entry', SYNTHETIC, ids=[e['name'] for e in SYNTHETIC])
def test_shipped_weight_reproduces_its_manifest_metrics(entry, tmp_path):
    """Re-evaluates on the embedded benchmark it was trained on (the demo's: BenchmarkConfig defaults, the
    recipe's seed): validation split and the OOD sets, regenerated deterministically from the seed."""
    model = timm.create_model(entry['name'], pretrained=True).eval()
    assert model.ood_threshold == pytest.approx(entry['model_args']['ood_threshold'])
    config = BenchmarkConfig(train_per_class=1, seed=entry['recipe']['config']['seed'])
    bench = SyntheticBenchmark(tmp_path / 'bench', config).prepare(progress=False)
    size = entry['recipe']['config']['img_size']
    transform = timm.data.create_transform(**timm.data.resolve_data_config(
        {'input_size': (3, size, size), 'crop_pct': entry['recipe']['config']['crop_pct']}, model=model))
    loader = lambda ds: DataLoader(ds, batch_size=128, num_workers=2)  # noqa: E731
    device = torch.device('cpu')
    val = collect(model, loader(bench.val_dataset(transform)), device)
    oods = {k: collect(model, loader(v), device) for k, v in bench.ood_datasets(transform).items()}
    report = ssod_report(val, oods)
    expected = entry['metrics']
    assert report['id_accuracy'] == pytest.approx(expected['id_accuracy'], abs=0.2)
    for name, metrics in expected['ood'].items():
        for k in ('fpr95', 'auroc', 'aupr_in', 'aupr_out'):  # the model card reports all four
            assert report['ood'][name][k] == pytest.approx(metrics[k], abs=0.2), (name, k)


@pytest.mark.parametrize('entry', SYNTHETIC, ids=[e['name'] for e in SYNTHETIC])
def test_shipped_thresholds_keep_95_percent_of_their_calibration_images(entry, tmp_path):
    """Both thresholds were set by `ssod calibrate` on the ID images of the study's validation draw (generator
    seed 1, 50 per class; each image is drawn from its own seeded generator, so the other counts do not change
    them), which the folder's config.json names: each keeps 95% of those images (one image either way: batching
    changes the last bits of a score, and a threshold is one image's value)."""
    folder = Path(__file__).resolve().parent.parent / 'weights' / entry['name']
    assert 'validation draw' in json.loads((folder / 'config.json').read_text())['calibration']['data']
    model = timm.create_model(entry['name'], pretrained=True).eval()
    assert (model.ood_threshold, model.spatial_threshold) == (entry['model_args']['ood_threshold'],
                                                              entry['model_args']['spatial_threshold'])
    config = BenchmarkConfig(seed=1, train_per_class=1, val_per_class=50, ood_per_set=1)
    bench = SyntheticBenchmark(tmp_path / 'bench', config).prepare(progress=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    val = collect(model, DataLoader(bench.val_dataset(transform), batch_size=128, num_workers=2),
                  torch.device('cpu'), spatial=True)
    for scores, threshold in ((val['ood_factor'], model.ood_threshold), (val['spatial_top3'], model.spatial_threshold)):
        kept = (scores >= threshold).float().mean().item()
        assert kept == pytest.approx(0.95, abs=1.01 / len(scores)), f'a threshold keeps {kept:.2%} of ID images'
