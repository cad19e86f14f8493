"""The training recipe's pieces: data loading leaves the training RNG alone, the optimizer, model kwargs."""
import random

import torch

from ssod_zoo.app.train import _SeededTransform


def test_seeded_transform_leaves_the_global_rngs_alone():
    def augment(x):
        return x + torch.rand(1).item() + random.random()

    ds = _SeededTransform([(0.0, 0), (1.0, 1)], augment, seed=3)
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(123)
    random.seed(123)
    first = [ds[i][0] for i in range(2)]
    assert (torch.rand(3).tolist(), [random.random() for _ in range(3)]) == (expected[0].tolist(), expected[1])
    assert [ds[i][0] for i in range(2)] == first  # still a pure function of (seed, epoch, index)


def test_no_weight_decay_on_norms_and_biases():
    import timm

    from ssod_zoo.app.train import TrainConfig, _optimizer
    model = timm.create_model('ssod_test_resnet', num_classes=3)
    optimizer = _optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.05))
    decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0.05 for p in g['params']}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim > 1), name  # conv/linear weights decay; BN and biases do not
    assert all(g['lr'] == 1e-3 for g in optimizer.param_groups)


def test_model_kwargs_are_parsed_as_timm_parses_them():
    import pytest

    from ssod_zoo.app.train import TrainError, _parse_model_kwargs
    assert _parse_model_kwargs(['output_stride=16', 'act_layer=relu', 'drop_rate=0.1']) == \
        {'output_stride': 16, 'act_layer': 'relu', 'drop_rate': 0.1}
    with pytest.raises(TrainError, match='key=value'):
        _parse_model_kwargs(['output_stride'])


def test_the_training_loop_reads_the_device_once_every_read_every_steps(tmp_path, monkeypatch):
    """float()/.item()/bool() on a tensor wait for the GPU: the loop sums on the device and reads every N steps."""
    import sys

    import torch

    from ssod_zoo.app import train as train_module
    from ssod_zoo.app.synthetic import BenchmarkConfig, SyntheticBenchmark
    bench = SyntheticBenchmark(tmp_path / 'bench', BenchmarkConfig(
        num_classes=3, image_size=32, train_per_class=8, val_per_class=2, ood_per_set=2)).prepare(
        workers=1, progress=False).root
    assert train_module.READ_EVERY >= 10  # the shipped interval: at most one host sync per 10 steps
    monkeypatch.setattr(train_module, 'READ_EVERY', 5)
    reads = []
    for name in ('item', 'tolist', '__float__', '__bool__'):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename == train_module.__file__ and caller.co_name in ('train', '_train_epoch'):
                reads.append(caller.co_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    train_module.main(['--model', 'ssod_test_resnet', '--data', 'folder', '--train-dir', str(bench / 'id' / 'train'),
                       '--val-dir', str(bench / 'id' / 'val'), '--img-size', '32', '--batch-size', '2',
                       '--workers', '0', '--epochs', '1', '--out-dir', str(tmp_path / 'run'), '--no-progress'])
    # 24 images, batch 2: 12 steps, read after steps 5 and 10 and after the last one; nothing outside those reads
    assert reads == ['_train_epoch'] * 3, reads
