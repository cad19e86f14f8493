"""The README's and the model card's code, run as pasted: a newcomer found two snippets that failed."""
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def python_block(doc: Path, after: str) -> str:
    """The first ```python block after the line ``after``."""
    text = doc.read_text()
    match = re.search(re.escape(after) + r'\n.*?```python\n(.*?)```', text, re.S)
    assert match, f'no python block after {after!r} in {doc}'
    return match.group(1)


def test_readme_use_runs_as_pasted():
    scope = {'x': torch.randn(2, 3, 64, 64)}  # the one name the snippet leaves to the reader
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        exec(python_block(ROOT / 'README.md', '## Use'), scope)
    # no warning but the one the snippet's 2 images earn: too few to calibrate on
    assert {str(w.message).split(':')[0] for w in caught} == {'calibrate_threshold'}, [str(w.message) for w in caught]
    assert scope['out'].logits.shape == (2, 10) and scope['keep'].shape == (2,)
    assert scope['posterior'].shape == (2, 11) and scope['energy_full'].shape == (2,)
    # the snippet's readouts are the ones its comments name
    cls_map = scope['cls_map']
    torch.testing.assert_close(scope['score'], cls_map.amax(1).flatten(1).topk(3, dim=1).values.mean(1))
    torch.testing.assert_close(scope['energy'], cls_map.logsumexp(1).flatten(1).amax(1))


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_model_card_snippet_runs_on_grayscale_and_colour_files(mode, tmp_path, monkeypatch):
    Image.new(mode, (40, 30), color=128 if mode == 'L' else (90, 140, 200)).save(tmp_path / 'photo.png')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(python_block(ROOT / 'MODEL_CARD.md', 'which `model.accepts(scores)` and `ssod predict` then use.')
         .replace('<tag>', 'synthetic'), scope)
    # the label the weights' own rule gives, worked out here: the chosen readout's score against its threshold
    model, scores = scope['model'], scope['scores']
    threshold = {'spatial': model.spatial_threshold, 'factor': model.ood_threshold}[model.readout]
    score = {'spatial': scores.spatial_score, 'factor': scores.ood_factor}[model.readout]
    known = score.item() >= threshold
    assert scope['label'] == (model.pretrained_cfg['label_names'][scores.logits.argmax(1).item()] if known
                              else 'unknown')


@pytest.mark.parametrize('ce_only', [False, True])
def test_generated_card_snippet_runs(ce_only, tmp_path, monkeypatch):
    """The card's snippet runs as pasted; a cross-entropy baseline's card (``ce_only`` in its training config)
    says its OOD head is untrained and decides with the spatial score alone, where an SSOD model's also applies
    the threshold on ``ood_factor``."""
    import ssod_zoo

    folder = ssod_zoo.save_pretrained(ssod_zoo.load_model('ssod_test_resnet.synthetic'), tmp_path / 'hub',
                                      train_config={'ce_only': ce_only, 'epochs': 1})
    Image.new('L', (40, 30), color=128).save(tmp_path / 'photo.png')
    monkeypatch.chdir(tmp_path)
    code = python_block(folder / 'README.md', '## How to use')
    code = code.replace('hf-hub:<org>/<this-repo>', f'local-dir:{folder}')
    scope = {}
    exec(code, scope)
    card = (folder / 'README.md').read_text()
    if ce_only:
        assert scope['keep'].shape == (1,) and 'keep_eq15' not in scope and "readout='factor'" not in code
        assert 'cross-entropy baseline' in card and 'never trained' in card and 'model.ood_threshold' not in card
    else:
        assert scope['keep'].shape == scope['keep_eq15'].shape == scope['keep_spatial'].shape == (1,)
        assert 'never trained' not in card
        # the shipped weight's readout decides
        assert torch.equal(scope['keep'], scope['keep_spatial']) and scope['model'].readout == 'spatial'
        assert 'model.ood_threshold = ' in card and 'model.spatial_threshold = ' in card
