"""`ssod train` on a folder with corrupt images: one line with how many and which, no traceback."""
import shutil

import pytest

from ssod_zoo.app.train import main


@pytest.mark.parametrize('workers', [0, 1])
def test_corrupt_images_are_counted_and_named_in_one_line(small_bench, tmp_path, capsys, workers):
    data = tmp_path / 'data'
    shutil.copytree(small_bench / 'id' / 'train', data)
    bad = sorted(data.glob('*/*.png'))[:5]
    for p in bad:
        p.write_bytes(b'not a png')
    with pytest.raises(SystemExit) as e:
        main(['--model', 'ssod_test_resnet', '--model-kwargs', 'output_stride=16', '--data', 'folder',
              '--train-dir', str(data),
              '--val-dir', str(small_bench / 'id' / 'val'), '--img-size', '64', '--batch-size', '8',
              '--workers', str(workers), '--epochs', '1', '--out-dir', str(tmp_path / 'run'), '--no-progress'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    total = len(list(data.glob('*/*.png'))) + len(list((small_bench / 'id' / 'val').glob('*/*.png')))
    assert err.startswith(f'ssod train: error: 5 of {total} images cannot be read: cannot read image {bad[0]}')
    assert str(bad[1]) in err and str(bad[2]) in err and 'and 2 more' in err


def test_a_bad_file_in_the_ood_folder_stops_the_run_before_training(small_bench, tmp_path, capsys):
    """Validation and OOD folders are first read after an epoch: a bad file there stops the run before it starts,
    not after an epoch it would have cost (nothing was trained, nothing is lost)."""
    ood = tmp_path / 'ood'
    shutil.copytree(small_bench / 'ood' / 'near', ood)
    (ood / 'zz.png').write_bytes(b'junk')
    with pytest.raises(SystemExit) as e:
        main(['--model', 'ssod_test_resnet', '--model-kwargs', 'output_stride=16', '--data', 'folder',
              '--train-dir', str(small_bench / 'id' / 'train'), '--val-dir', str(small_bench / 'id' / 'val'),
              '--ood-dirs', str(ood), '--img-size', '64', '--batch-size', '8', '--workers', '0', '--epochs', '1',
              '--out-dir', str(tmp_path / 'run'), '--no-progress'])
    captured = capsys.readouterr()
    assert e.value.code == 2 and 'training ssod_test_resnet' not in captured.out
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('ssod train: error: 1 of ') and str(ood / 'zz.png') in err
