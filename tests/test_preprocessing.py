"""Every way of getting a trained model carries the preprocessing it was trained with, and every command uses it.

One run trains at 64 px with crop 1.0 (ssod_test_resnet's timm default is 160 px, crop 0.875); each path that
starts from its checkpoint must give 64 px and crop 1.0, never the architecture's default.
"""
import json

import pytest
import timm
import torch

import ssod_zoo
from ssod_zoo.app.train import main as train_main

SIZE, CROP = 64, 1.0


@pytest.fixture(scope='module')
def run(tmp_path_factory, small_bench):
    """best.pt of a one-epoch run at 64 px, crop 1.0."""
    bench = small_bench
    out = tmp_path_factory.mktemp('run')
    train_main(['--model', 'ssod_test_resnet', '--data', 'folder', '--train-dir', str(bench / 'id' / 'train'),
                '--val-dir', str(bench / 'id' / 'val'), '--ood-dirs', str(bench / 'ood' / 'near'),
                '--img-size', str(SIZE), '--crop-pct', str(CROP), '--batch-size', '8', '--workers', '0',
                '--epochs', '1', '--out-dir', str(out), '--no-progress'])
    assert timm.get_pretrained_cfg('ssod_test_resnet').input_size[1] != SIZE  # the test would prove nothing
    return out / 'best.pt'


def _assert_trained_preprocessing(model):
    cfg = timm.data.resolve_data_config(model=model)
    assert tuple(cfg['input_size']) == (3, SIZE, SIZE)
    assert cfg['crop_pct'] == CROP


def test_load_model_of_a_checkpoint_resolves_the_trained_transform(run):
    _assert_trained_preprocessing(ssod_zoo.load_model(run))


def test_save_pretrained_from_a_checkpoint_records_the_trained_size(run, tmp_path):
    model, ckpt = ssod_zoo.load_checkpoint(run)
    ssod_zoo.save_pretrained(model, tmp_path / 'folder')  # no train_config: the model itself must carry it
    cfg = json.loads((tmp_path / 'folder' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == [3, SIZE, SIZE] and cfg['crop_pct'] == CROP
    _assert_trained_preprocessing(ssod_zoo.load_model(tmp_path / 'folder'))
    _assert_trained_preprocessing(ssod_zoo.load_model(f'local-dir:{tmp_path / "folder"}'))


def test_save_pretrained_records_the_size_a_python_user_gives(tmp_path):
    """Trained and calibrated in Python at another size than the architecture's: train_config's img_size and
    crop_pct become the folder's preprocessing and the size the card says the thresholds hold at."""
    model = timm.create_model('ssod_test_resnet', num_classes=3)
    model.ood_threshold, model.spatial_threshold = 0.5, 1.0
    default = timm.get_pretrained_cfg('ssod_test_resnet').input_size[1]
    for config, size in (({'img_size': SIZE, 'crop_pct': CROP}, SIZE), (None, default)):
        folder = ssod_zoo.save_pretrained(model, tmp_path / str(size), train_config=config)
        assert f'at {size}x{size} px' in (folder / 'README.md').read_text()
        loaded = ssod_zoo.load_model(folder)
        assert tuple(timm.data.resolve_data_config(model=loaded)['input_size']) == (3, size, size)
    _assert_trained_preprocessing(ssod_zoo.load_model(tmp_path / str(SIZE)))


def _onnx_input_hw(path):
    import onnx
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[2].dim_value, dims[3].dim_value


@pytest.mark.parametrize('source', ['checkpoint', 'folder', 'local-dir'])
def test_export_writes_a_graph_at_the_trained_size(run, tmp_path, source):
    import onnx  # noqa: F401  (the [test] extra installs it: a missing one fails here)
    from ssod_zoo.app.export import main as export_main
    spec = str(run)
    if source != 'checkpoint':
        ssod_zoo.save_pretrained(ssod_zoo.load_checkpoint(run)[0], tmp_path / 'folder')
        spec = ('local-dir:' if source == 'local-dir' else '') + str(tmp_path / 'folder')
    export_main([spec, '--out', str(tmp_path / 'm.onnx')])
    assert _onnx_input_hw(tmp_path / 'm.onnx') == (SIZE, SIZE)


def test_init_from_an_ssod_checkpoint_keeps_its_preprocessing(run, tmp_path):
    """--init from our own checkpoint: weights and the crop/mean/std it was trained with (not the arch default)."""
    from ssod_zoo.app.train import TrainConfig, _model
    model = _model(TrainConfig(model='ssod_test_resnet', init=str(run)), num_classes=3)
    trained = ssod_zoo.load_model(run)
    for k, v in trained.state_dict().items():
        if not k.startswith('ood_head.'):
            assert torch.equal(model.state_dict()[k], v), k
    assert model.pretrained_cfg['crop_pct'] == CROP
