"""SSOD weights on the Hugging Face Hub, in a local folder, or shipped inside the package.

Publishing
    :func:`save_pretrained` writes a hub-ready folder: ``config.json`` (timm's format: ``architecture``,
    ``model_args`` with every SSOD setting including both thresholds and ``return_ood``, a timm
    ``pretrained_cfg`` with ``label_names``), ``model.safetensors`` and ``README.md`` (a model card with HF
    ``model-index`` metadata). :func:`push_to_hub` uploads that folder through ``huggingface_hub``.
    ``ssod save <checkpoint> <dir>`` and ``ssod push <checkpoint> <repo_id>`` (:mod:`ssod_zoo.app.publish`) do
    both from a training checkpoint (:func:`load_checkpoint`). The card is :data:`ssod_zoo._card.TEMPLATE`.

Loading (plain timm, nothing from ssod_zoo to call)::

    model = timm.create_model('hf-hub:<org>/<repo>', pretrained=True)       # or '...@<revision>'
    model = timm.create_model('local-dir:/path/to/folder', pretrained=True)
    model = timm.create_model('ssod_test_resnet.<tag>', pretrained=True)    # a tag from timm.list_pretrained('ssod_*')
    keep = model.accepts(model.forward_scores(x))   # by model.readout; keeps 95% of ID validation images
    logits, ood_factor = model(x)
    keep_eq15 = model.accepts(ood_factor)           # the paper's readout, Eq. 15

A registered architecture can be pointed at one's own repo (or file) without registering anything::

    timm.create_model('ssod_resnet50', pretrained=True, num_classes=10,
                      pretrained_cfg_overlay=dict(hf_hub_id='me/my-ssod-resnet50', num_classes=10))

``num_classes`` must be given twice there (the model's and the weights'), as for any timm overlay. The other
model arguments the weights were saved with (``output_stride=16``, ...) and the thresholds are read from the
repo's ``config.json``, as the ``hf-hub:`` form reads them; arguments given explicitly win. A repo without
``config.json`` is refused with a clear error.

Every ``pretrained=True`` load is checked before timm reads the file, and fails with :class:`WeightsError` naming the
remedy: see :mod:`ssod_zoo._pretrained`, which also holds the weights shipped inside the package.
"""
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.models._hub import save_config_for_hf
from torch import nn

from . import _card
# the checks and clear errors behind every pretrained=True, and the shipped weights (re-exported for registry.py)
from ._pretrained import (  # noqa: F401
    CONFIG_NAME, MANIFEST_FORMAT, MANIFEST_NAME, MAX_SHIPPED_BYTES, WEIGHTS_NAME, NoDefaultWeights, WeightsError,
    _check_state_dict, _clear_errors, _download, _folder_config, _manifest_cfgs, _prepare_pretrained,
    _repo_model_args, _sha256, _shipped_model_args, _state_dict_mismatch, _weights_dir, not_cached)
from .adapter import (  # noqa: F401  (CALIBRATED: what holds only for the weights it was calibrated on)
    CALIBRATED, READOUTS, SSODModel, check_readout, check_spatial_threshold, check_threshold, user_stacklevel, wrap)

__all__ = ['WeightsError', 'calibrate_threshold', 'load_checkpoint', 'load_model', 'push_folder', 'push_to_hub',
           'save_pretrained', 'write_card']

CARD_NAME = 'README.md'
CHECKPOINT_FORMAT = 'ssod_zoo.train/1'
# the calibrated thresholds a model, a checkpoint and a hub folder's model_args carry, one per readout
THRESHOLDS = tuple(r.attribute for r in READOUTS.values())


# ---------------------------------------------------------------------------------------------------------------
# calibration


def calibrate_threshold(id_ood_factors: Union[torch.Tensor, Sequence[float]], tpr: float = 0.95) -> float:
    """The rejection threshold on a score that keeps a fraction ``tpr`` of in-distribution images.

    A pipeline keeps an image when ``score >= threshold`` and rejects it when ``score < threshold`` (higher =
    more in-distribution: ``ood_factor``, paper Eq. 15, or ``model.spatial_score``). The threshold is the
    ``ceil(tpr * N)``-th largest ID value, i.e. the largest threshold that keeps at least ``tpr`` of the ID images.
    Ties: every ID value equal to the threshold is kept, so when several images share it the kept fraction can
    exceed ``tpr``; it is never below. The threshold is one of the input values (exact in the input's dtype), so the
    ``<`` comparison in that dtype reproduces the calibration exactly.

    Args:
        id_ood_factors: (N,) scores of ID validation images (``ood_factor`` or ``model.spatial_score``), N >= 1,
            all finite. Too few to resolve ``tpr`` (under 20 at 0.95) give their minimum, with a warning.
        tpr: fraction of ID images to keep, in (0, 1]; 0.95 is the operating point of FPR95.

    Returns:
        The threshold, a Python float.
    """
    if isinstance(id_ood_factors, tuple) and hasattr(id_ood_factors, '_fields'):  # SSODScores, SSODOutput
        raise TypeError(f'calibrate_threshold takes one score per image, got a {type(id_ood_factors).__name__} of '
                        f'{", ".join(id_ood_factors._fields)}: pass the readout to calibrate, e.g. '
                        'scores.spatial_score (model.spatial_threshold) or scores.ood_factor (model.ood_threshold)')
    # a list's values in float64, not torch's float32 default: the threshold must be one of them
    x = id_ood_factors.detach() if isinstance(id_ood_factors, torch.Tensor) else \
        torch.as_tensor(id_ood_factors, dtype=torch.float64)
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f'id_ood_factors must be a non-empty (N,) vector, got shape {tuple(x.shape)}')
    if not x.is_floating_point():
        x = x.double()
    if not torch.isfinite(x).all():
        raise ValueError('id_ood_factors contains NaN or inf; check the model and the validation images')
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f'tpr must be in (0, 1], got {tpr}')
    # round before ceil so that e.g. 0.95 * 60 = 57.000000000000007 keeps 57 images, not 58
    keep = max(1, math.ceil(round(tpr * x.numel(), 6)))
    if x.numel() < fewest_to_resolve(tpr):  # keep == N: the threshold is their minimum
        warnings.warn(f'calibrate_threshold: {x.numel()} ID value(s) cannot resolve tpr={tpr} (that takes at least '
                      f'{fewest_to_resolve(tpr)}; a few hundred for a stable threshold), so the threshold is their '
                      'minimum and keeps all of them; calibrate on more ID validation images', stacklevel=2)
    return float(torch.sort(x.flatten().cpu(), descending=True).values[keep - 1])


def fewest_to_resolve(tpr: float = 0.95) -> int:
    """The fewest ID values :func:`calibrate_threshold` needs to keep a fraction ``tpr`` of them rather than all
    (20 at 0.95); 1 at ``tpr`` 1."""
    return 1 if tpr >= 1.0 else math.ceil(round(1 / (1 - tpr), 6))


# ---------------------------------------------------------------------------------------------------------------
# publishing


def save_pretrained(
        model: SSODModel,
        save_dir: Union[str, Path],
        *,
        train_config: Optional[Mapping[str, Any]] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        class_names: Optional[Sequence[str]] = None,
        ood_threshold: Optional[float] = None,
        spatial_threshold: Optional[float] = None,
        calibration: Optional[Mapping[str, Any]] = None,
        ood_head_trained: Optional[bool] = None,
        model_card: bool = True,
) -> Path:
    """Write a folder that ``timm.create_model('hf-hub:...'/'local-dir:...', pretrained=True)`` loads.

    Args:
        model: the SSOD model (from ``timm.create_model('ssod_*')`` or :func:`ssod_zoo.wrap` of a registered trunk).
        save_dir: folder to write (created if needed); only ``config.json``, ``model.safetensors`` and
            ``README.md`` are written.
        train_config: the resolved training config, shown in the model card. Its ``img_size`` and ``crop_pct``
            set the folder's preprocessing (``input_size``, ``crop_pct``), which loading applies and the card names
            as the size the thresholds hold at; without them, the model's ``pretrained_cfg`` gives both (the
            architecture's defaults, unless you set them): pass ``{'img_size': N}`` when you trained or calibrated
            at another size in Python.
        metrics: ``{'id_accuracy': float, 'ood': {set_name: {'fpr95', 'auroc', 'aupr_in', 'aupr_out'}}}``, in
            percent, measured for these weights; an optional ``'id_dataset'`` names the ID data in the card.
        class_names: (M,) names of the classes, in classifier order; saved as ``label_names``.
        ood_threshold: rejection threshold on ``ood_factor`` to save; default ``model.ood_threshold``.
        spatial_threshold: rejection threshold on ``model.spatial_score`` to save; default
            ``model.spatial_threshold``.
        calibration: what the thresholds were calibrated on, ``{'data': name, 'images': N}``, when not the
            training run's ID validation data (``ssod calibrate`` records it; the card shows it). Default: the
            record of the folder the model was loaded from, while its thresholds and readout are still that
            folder's.
        ood_head_trained: whether the OOD head was trained; default: not ``train_config['ce_only']`` when a
            training config is given, else ``model.ood_head_trained``. False (a cross-entropy twin) saves no
            ``ood_threshold`` and no ``factor`` readout: its ``ood_factor`` means nothing.
        model_card: write ``README.md``.

    Returns:
        The folder's path.
    """
    if not isinstance(model, SSODModel):
        raise TypeError(f'save_pretrained expects an SSOD model, got {type(model).__name__}; '
                        'create one with timm.create_model("ssod_<arch>") or ssod_zoo.wrap(model)')
    architecture = _ssod_architecture(model)
    _check_metrics(metrics)
    threshold = model.ood_threshold if ood_threshold is None else ood_threshold
    threshold = None if threshold is None else check_threshold(threshold)
    if ood_head_trained is None and train_config:
        ood_head_trained = _card.ood_head_trained({}, train_config)
    if ood_head_trained is None and not getattr(model, 'ood_head_trained', True):
        ood_head_trained = False  # a twin loaded from its folder
    if ood_head_trained is False:
        threshold = None
    held = getattr(model, '_calibration_record', None)
    stale = _stale_thresholds(model) if ood_threshold is None and spatial_threshold is None else []
    if stale:
        them = 'them' if len(stale) > 1 else 'it'
        warnings.warn(f'save_pretrained: the model\'s {" and ".join(stale)} {"were" if len(stale) > 1 else "was"} '
                      'calibrated for the weights it was loaded with, and the weights its score reads have changed '
                      'since (trained, a forward pass in train mode updating BatchNorm statistics, or converted): '
                      f'saved as {"they are" if len(stale) > 1 else "it is"}, without the record of what it was '
                      f'calibrated on; calibrate {them} for these weights on ID validation images (`ssod calibrate '
                      'FOLDER --val-dir DIR` on the saved folder)', stacklevel=2)
    if calibration is None and held and not stale and ood_threshold is None and spatial_threshold is None and all(
            held['state'].get(k) == getattr(model, k, None) for k in CALIBRATED):
        calibration = held['record']  # a loaded folder saved again, its calibration untouched: its record goes too
    spatial = getattr(model, 'spatial_threshold', None) if spatial_threshold is None else spatial_threshold
    spatial = None if spatial is None else check_spatial_threshold(spatial)
    readout = getattr(model, 'readout', None)
    readout = None if readout is None else check_readout(readout)
    if readout == 'factor' and ood_head_trained is False:
        readout = None
    saved = {'spatial_threshold': spatial, 'ood_threshold': threshold}
    loaded = still_loaded(model)  # a value passed here, or set on the model since, was not calibrated with it
    by_hand = [k for k, v in saved.items() if v is not None and (k not in loaded or v != getattr(model, k, None))]
    if by_hand and not (train_config or {}).get('img_size'):
        size = ((getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or [None])[-1]
        warnings.warn(f'save_pretrained: nothing says at what input size the {" and ".join(by_hand)} set in Python '
                      f'{"were" if len(by_hand) > 1 else "was"} calibrated, so the folder and its card record the '
                      f'model\'s own, {size} px, and loading will preprocess at that size; pass '
                      'train_config={"img_size": N} if you scored the calibration images at N px', stacklevel=2)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != model.num_classes:
            raise ValueError(f'{len(class_names)} class_names for a model with {model.num_classes} classes')
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)

    # contiguous CPU copies: safetensors refuses views and channels_last tensors
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(save_dir / WEIGHTS_NAME), metadata={'format': 'pt'})
    _readable(save_dir / WEIGHTS_NAME)

    model_config: Dict[str, Any] = {
        'architecture': architecture,
        # a plain timm reading this folder from the Hub must take the safetensors file, never a pickle fallback
        'pretrained_cfg': {'hf_hub_filename': WEIGHTS_NAME},
    }
    if class_names:
        model_config['label_names'] = class_names
    if ood_head_trained is not None:  # a cross-entropy twin's: ssod calibrate and the card skip its ood_threshold
        model_config['ood_head_trained'] = ood_head_trained
    if calibration:
        model_config['calibration'] = dict(calibration)
    config_path = save_dir / CONFIG_NAME
    save_config_for_hf(model, str(config_path), model_config=model_config,
                       model_args={'return_ood': bool(model.return_ood), 'ood_threshold': threshold,
                                   'spatial_threshold': spatial, 'readout': readout,
                                   'ood_head_trained': ood_head_trained is not False})
    config = json.loads(config_path.read_text())
    config['pretrained_cfg']['architecture'] = architecture
    _record_input_size(config['pretrained_cfg'], model, train_config)
    if class_names:
        config['pretrained_cfg']['label_names'] = class_names
    config_path.write_text(json.dumps(config, indent=2) + '\n')

    if model_card:
        write_card(save_dir, train_config=train_config, metrics=metrics)
    return save_dir


def write_card(save_dir: Union[str, Path], *, train_config: Optional[Mapping[str, Any]] = None,
               metrics: Optional[Mapping[str, Any]] = None) -> Path:
    """(Re)write the model card, ``README.md``, of a folder :func:`save_pretrained` wrote, from its
    ``config.json``; the weights are not touched (``ssod release`` adds the test numbers once they are measured).
    ``train_config`` and ``metrics`` are :func:`save_pretrained`'s. Returns the card's path."""
    _check_metrics(metrics)
    save_dir = Path(save_dir)
    config = json.loads((save_dir / CONFIG_NAME).read_text())
    path = save_dir / CARD_NAME
    _card.model_card(config, train_config=train_config, metrics=metrics, name=save_dir.resolve().name).save(path)
    return path


def _fingerprints(model: nn.Module) -> Optional[Dict[str, Tuple[float, ...]]]:
    """Per threshold, one float64 sum per floating-point tensor its score depends on: ``ood_factor`` on all but
    the classifier, ``spatial_score`` on all but the OOD head. A sum moves when those weights are trained (BatchNorm
    statistics too) or converted. None on the meta device, which has no values."""
    state = {k: t for k, t in model.state_dict().items() if t.is_floating_point()}
    if any(t.device.type == 'meta' for t in state.values()):
        return None
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'fc'
    with torch.no_grad():
        sums = {k: float(t.double().sum()) for k, t in state.items()}
    return {'ood_threshold': tuple(v for k, v in sums.items() if not k.startswith(classifier + '.')),
            'spatial_threshold': tuple(v for k, v in sums.items() if not k.startswith('ood_head.'))}


def _remember_calibration(model: SSODModel, skip: Collection[str] = ()) -> None:
    """Note the thresholds a model was loaded with, the weights their scores read and the input size they were
    calibrated at (its preprocessing's): ``save_pretrained`` warns when the weights move under them, and an ONNX
    export at another size leaves them out. Thresholds set by hand later, or passed to ``create_model`` (``skip``),
    are the caller's, and none of this applies to them."""
    state = {k: getattr(model, k) for k in THRESHOLDS if k not in skip}
    if all(v is None for v in state.values()):
        return
    size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size')
    model._calibrated_weights = {'state': state,
                                 'fingerprints': _fingerprints(model),
                                 'input_size': None if size is None else tuple(int(v) for v in size)}


def still_loaded(model: nn.Module) -> List[str]:
    """The thresholds the model still holds as it was loaded with them (from a saved folder, a tag or a training
    checkpoint), calibrated with its weights; not those set by hand since, or passed to ``create_model``."""
    loaded = getattr(model, '_calibrated_weights', None) or {'state': {}}
    return [k for k, v in loaded['state'].items() if v is not None and getattr(model, k, None) == v]


def loaded_calibration_size(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """The input size the thresholds in :func:`still_loaded` were calibrated at (their preprocessing's); None when
    the model holds none of them, or the size is unknown."""
    loaded = getattr(model, '_calibrated_weights', None)
    if not loaded or not loaded.get('input_size') or not still_loaded(model):
        return None
    return loaded['input_size']


def _stale_thresholds(model: nn.Module) -> list:
    """The thresholds a loaded model still holds from loading, when the weights their score reads have changed."""
    loaded = getattr(model, '_calibrated_weights', None)
    if not loaded or loaded['fingerprints'] is None:
        return []
    kept = [k for k, v in loaded['state'].items() if v is not None and getattr(model, k, None) == v]
    now = _fingerprints(model) if kept else None
    return [k for k in kept if now is not None and now[k] != loaded['fingerprints'][k]]


def _check_metrics(metrics: Optional[Mapping[str, Any]]) -> None:
    """The card reads ``id_accuracy`` and ``ood`` (set name -> metric name -> value); metrics without either
    would give a card without results, so they are refused rather than dropped."""
    if not metrics:
        return
    ood = metrics.get('ood')
    if (metrics.get('id_accuracy') is None and not ood) or (ood is not None and not (
            isinstance(ood, Mapping) and all(isinstance(v, Mapping) for v in ood.values()))):
        raise ValueError('metrics must be {"id_accuracy": float, "ood": {set_name: {"fpr95": ..., "auroc": ...}}} '
                         f'(percent), got {dict(metrics)!r}; the model card reads its results from those keys')


def _readable(path: Path) -> None:
    """The mode a plain ``open()`` would have given: safetensors writes its file 0600 (through a temporary file),
    so a weight shared from a server or a container would be readable by its owner alone."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def set_thresholds(save_dir: Union[str, Path], thresholds: Mapping[str, Optional[float]], id_dataset: str,
                   images: Optional[int] = None, readout: Optional[Mapping[str, Any]] = None) -> Path:
    """Write recalibrated thresholds into a folder :func:`save_pretrained` wrote: ``config.json``'s model arguments
    and ``calibration`` (what they were calibrated on), and the card's threshold section. The weights are not
    touched (``ssod calibrate``). Returns the config's path.

    Args:
        thresholds: ``{'ood_threshold': ..., 'spatial_threshold': ...}``, either may be left out.
        id_dataset: what they were calibrated on, as the card names it.
        images: how many images that was.
        readout: the readout chosen on OOD validation images, ``{'readout': name, 'ood_data': [set names],
            'fpr95': {name: average FPR95}, 'id_data': name}`` (the model argument ``readout`` and
            ``calibration['readout']``; ``id_data``, the ID images whose thresholds the FPR95 were read at, is
            optional); default: the folder's earlier choice stays, and the card says when it was read at the
            thresholds of another calibration.
    """
    unknown = set(thresholds) - set(THRESHOLDS)
    if unknown:
        raise ValueError(f'unknown thresholds {sorted(unknown)}; one of {THRESHOLDS}')
    checks = {r.attribute: r.check for r in READOUTS.values()}
    save_dir = Path(save_dir)
    config_path = save_dir / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config.setdefault('model_args', {}).update(
        {k: None if v is None else checks[k](v) for k, v in thresholds.items()})
    if config.get('ood_head_trained') is False:  # a twin's folder from before the flag was a model argument
        config['model_args']['ood_head_trained'] = False
    chosen = (config.get('calibration') or {}).get('readout')
    if chosen and not chosen.get('id_data') and (config.get('calibration') or {}).get('data'):
        # a record from before id_data existed was made at the thresholds of the calibration it sits in
        chosen = {**chosen, 'id_data': config['calibration']['data']}
    if readout is not None:
        chosen = {**readout, 'readout': check_readout(readout['readout'])}
        config['model_args']['readout'] = chosen['readout']
    config['calibration'] = {'data': id_dataset, 'images': images, 'keep': 0.95,
                             **({'readout': chosen} if chosen else {})}
    config_path.write_text(json.dumps(config, indent=2) + '\n')
    card = save_dir / CARD_NAME
    if card.is_file():
        text, section = card.read_text(), _card.threshold_section(config)
        # the section runs to the next heading or the end; cards from before it existed have an older one, or none
        found = re.search(r'^## Rejection thresholds?\n.*?(?=^## |\Z)', text, flags=re.M | re.S)
        if found:
            rest = text[found.end():]
            text = text[:found.start()] + section + ('\n\n' + rest if rest.strip() else '\n')
        elif '\n## Results\n' in text:
            text = text.replace('\n## Results\n', '\n' + section + '\n\n## Results\n', 1)
        else:  # a card written by hand: the section goes at the end, and its own text may quote old values
            text = text.rstrip('\n') + '\n\n' + section + '\n'
            warnings.warn(f'{card} had no "## Rejection thresholds" section: one was added at its end; check the '
                          'rest of the card for thresholds it quotes', stacklevel=2)
        card.write_text(text)
    return config_path


def _record_input_size(cfg: Dict[str, Any], model: nn.Module, train_config: Optional[Mapping[str, Any]]) -> None:
    """The input size and eval crop the weights were trained and measured at, and the feature-map size that
    gives with the weights' model arguments (output_stride changes it), so the config describes these weights."""
    train_config = train_config or {}
    if train_config.get('img_size'):
        size = int(train_config['img_size'])
        cfg['input_size'] = [cfg.get('input_size', [3])[0], size, size]
    if train_config.get('crop_pct'):
        cfg['crop_pct'] = float(train_config['crop_pct'])
    if cfg.get('input_size'):
        was_training = model.training
        param = next(model.parameters())
        with torch.no_grad():
            x = torch.zeros(1, *cfg['input_size'], device=param.device, dtype=param.dtype)
            cfg['pool_size'] = list(model.eval().forward_features(x).shape[-2:])
        model.train(was_training)


def push_to_hub(
        model: SSODModel,
        repo_id: str,
        *,
        revision: Optional[str] = None,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: str = 'Add SSOD weights (ssod_zoo)',
        api: Optional[HfApi] = None,
        **save_kwargs: Any,
):
    """Upload what :func:`save_pretrained` writes to a Hub model repo (created if needed).

    Args:
        model: the SSOD model.
        repo_id: ``'<org>/<name>'``.
        revision: branch to commit to (created from the default branch if missing); default the main branch.
        private: create the repo private (an existing repo keeps its visibility).
        token: Hub token; default the logged-in one (``hf auth login``) or ``HF_TOKEN``.
        commit_message: the commit's message.
        api: the ``HfApi`` to use (tests pass a stand-in); default ``HfApi(token=token)``.
        **save_kwargs: :func:`save_pretrained` keywords (``train_config``, ``metrics``, ``class_names``, ...).

    Returns:
        The ``CommitInfo`` of the upload.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / repo_id.split('/')[-1], **save_kwargs)  # the card's name
        return _upload(folder, repo_id, revision, private, token, commit_message, api,
                       later='write the folder now with ssod_zoo.save_pretrained(model, DIR, ...) and upload it later '
                             f'with ssod_zoo.push_folder(DIR, {repo_id!r}) or `hf upload {repo_id} DIR`')


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        *,
        revision: Optional[str] = None,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: str = 'Add SSOD weights (ssod_zoo)',
        api: Optional[HfApi] = None,
):
    """Upload a folder as it is (one :func:`save_pretrained` wrote, or ``ssod release``) to a Hub model repo,
    created if needed; the arguments are :func:`push_to_hub`'s. Returns the ``CommitInfo`` of the upload."""
    return _upload(folder, repo_id, revision, private, token, commit_message, api,
                   later=f'the folder is untouched: upload it later with the same call or '
                         f'`hf upload {repo_id} {folder}`')


def _upload(folder, repo_id, revision, private, token, commit_message, api, later: str):
    """:func:`push_folder`. A network, offline-mode or Hub HTTP error propagates as huggingface_hub raised it,
    with a note (Python >= 3.11) that says what failed and how to upload ``later``."""
    from . import __version__
    api = api if api is not None else HfApi(token=token, library_name='ssod_zoo', library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model').repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type='model')
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, repo_type='model',
                                 commit_message=commit_message)
    except Exception as e:
        if is_network_error(e) and hasattr(e, 'add_note'):
            e.add_note(f'ssod_zoo: uploading to the Hugging Face Hub repo {repo_id} failed (network, offline mode, '
                       f'token or permission){offline_hint()}. Nothing is lost: {later}')
        raise


def offline_hint() -> str:
    """What an upload error adds when huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``), else ''."""
    from huggingface_hub import constants
    return '; HF_HUB_OFFLINE=1 is set: unset it to upload' if constants.is_offline_mode() else ''


def is_network_error(e: BaseException) -> bool:
    """Connection, offline-mode and Hub HTTP errors: huggingface_hub raises its own, or its HTTP client's (requests
    and urllib3 before 1.0, httpx after, httpx2 in 2.x)."""
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, OfflineModeIsEnabled
    if isinstance(e, (HFValidationError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return False  # a bad repo id or a local file: the same call fails again later
    transport = ('httpx', 'httpcore', 'requests', 'urllib3', 'huggingface_hub')
    return (isinstance(e, (OSError, HfHubHTTPError, OfflineModeIsEnabled, TimeoutError)) or
            type(e).__module__.split('.')[0].startswith(transport))


def _ssod_architecture(model: SSODModel) -> str:
    """The registered ``ssod_*`` name that rebuilds ``model``; a wrapped timm trunk maps to ``ssod_<trunk>``."""
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or ''
    if arch.startswith('ssod_') and timm.is_model(arch):
        return arch
    if timm.is_model(f'ssod_{arch}'):
        return f'ssod_{arch}'
    if arch and '.' not in arch and timm.is_model(arch):  # a wrap of any other timm CNN
        from .registry import register
        return register(arch)
    raise ValueError(
        f'cannot save {type(model).__name__} (pretrained_cfg architecture {arch!r}): its config must name a '
        f'registered SSOD architecture so timm can rebuild it, and {"ssod_" + arch!r} is not one of '
        f'timm.list_models("ssod_*"), nor a timm architecture that ssod_zoo.register could register it for')


# ---------------------------------------------------------------------------------------------------------------
# training checkpoints


def load_checkpoint(path: Union[str, Path]) -> Tuple[SSODModel, Dict[str, Any]]:
    """Rebuild the model of a ``ssod_zoo.train/1`` training checkpoint, with ``torch.load(weights_only=True)``.

    Args:
        path: the checkpoint file the training CLI wrote.

    Returns:
        ``(model, checkpoint)``: the model in eval mode with the checkpoint's weights and thresholds,
        and the checkpoint dict (``config``, ``metrics``, ``class_names``, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no training checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, pickle with arbitrary objects, not a torch file at all
        if 'argparse.Namespace' in str(e):  # timm's train.py pickles its arguments into its checkpoints
            raise WeightsError(
                f'{path} holds an argparse.Namespace besides tensors: a checkpoint of timm\'s train.py, not of '
                '`ssod train`. Load it with timm.create_model(ARCH, num_classes=N, checkpoint_path=PATH) (which '
                'unpickles it: only for files you trust), then ssod_zoo.save_pretrained(model, FOLDER); its OOD '
                'head is as it was before that training, which trained the classifier alone (README, Drop-in '
                'mode)') from e
        text = str(e)
        if 'WeightsUnpickler error:' in text:  # torch's own advice (weights_only=False) is not ours to give
            text = ' '.join(text.split('WeightsUnpickler error:', 1)[1].split()[:12])
        raise WeightsError(
            f'cannot read {path} as a {CHECKPOINT_FORMAT} checkpoint with torch.load(weights_only=True) '
            f'({type(e).__name__}: {text.splitlines()[0] if text else ""}). It is truncated or corrupted, '
            'or not written by `python -m ssod_zoo.app.train`; ssod_zoo never unpickles arbitrary objects. '
            'Re-copy the file or point to another checkpoint of the run') from e
    if not isinstance(ckpt, dict) or ckpt.get('format') != CHECKPOINT_FORMAT:
        found = ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__
        weights = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
        if isinstance(weights, dict) and weights and all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise WeightsError(
                f'{path} holds model weights alone (a state dict), not a {CHECKPOINT_FORMAT} training checkpoint: '
                'build the model they are for (timm.create_model(\'ssod_<arch>\', num_classes=N) or '
                'ssod_zoo.wrap(\'<timm name>\')), load_state_dict them, and ssod_zoo.save_pretrained(model, DIR) '
                'for a folder every command takes; `ssod export ARCH --checkpoint FILE` exports them directly')
        raise WeightsError(f'{path} is not a {CHECKPOINT_FORMAT} training checkpoint (format: {found!r}); ssod_zoo '
                           'commands take the checkpoints `ssod train` writes, and saved folders')
    missing = [k for k in ('architecture', 'model_args', 'model') if k not in ckpt]
    if missing:
        raise WeightsError(f'{path} lacks {", ".join(missing)}; it is incomplete, re-export it from training')
    arch = ckpt['architecture']
    if not timm.is_model(arch):
        raise WeightsError(f'{path} was trained as {arch!r}, which is not a registered model here; '
                           'install the ssod_zoo version that trained it')
    model = timm.create_model(arch, pretrained=False, **dict(ckpt['model_args']))
    if not isinstance(model, SSODModel):  # the training CLI wraps a plain timm CNN it was given by name
        model = wrap(model)
    state_dict = timm.models.clean_state_dict(ckpt['model'])  # drops a DDP "module." prefix
    problem = _state_dict_mismatch(state_dict, model, head_dropped=False)
    if problem:
        raise WeightsError(f'{path}: the weights do not fit {arch} built with {ckpt["model_args"]}: {problem}. '
                           'The checkpoint is inconsistent; re-export it from training')
    model.load_state_dict(state_dict)
    for key in THRESHOLDS:
        setattr(model, key, None if ckpt.get(key) is None else float(ckpt[key]))
    model.ood_head_trained = _card.ood_head_trained({}, ckpt.get('config') or {'ce_only': False})
    model.pretrained_cfg = {**model.pretrained_cfg, **_checkpoint_data_config(ckpt)}
    if ckpt.get('class_names') and len(ckpt['class_names']) == model.num_classes:
        model.pretrained_cfg['label_names'] = tuple(str(c) for c in ckpt['class_names'])
    if _checkpoint_data_config(ckpt).get('input_size'):  # the size the run calibrated its thresholds at
        _remember_calibration(model)
    return model.eval(), ckpt


def _checkpoint_data_config(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """The preprocessing a checkpoint was trained and calibrated with (input size, crop, interpolation, mean,
    std); checkpoints older than ``data_config`` have it only as ``config.img_size`` / ``config.crop_pct``."""
    if ckpt.get('data_config'):
        return dict(ckpt['data_config'])
    config, data_cfg = ckpt.get('config') or {}, {}
    if config.get('img_size'):
        data_cfg['input_size'] = (3, int(config['img_size']), int(config['img_size']))
    if config.get('crop_pct'):
        data_cfg['crop_pct'] = float(config['crop_pct'])
    return data_cfg


def registered(spec: str) -> bool:
    """Whether ``spec`` names a registered timm model, with or without its pretrained tag (``ssod_resnet18.fmnist``):
    ``ssod_<trunk>`` of any timm CNN is registered here, as ``timm.create_model`` would."""
    from .registry import register_on_request
    arch = spec.split('.')[0]
    try:
        register_on_request(arch)
    except ValueError:  # not a CNN
        return False
    return timm.is_model(arch)


def load_model(spec: Union[str, Path], **kwargs: Any) -> SSODModel:
    """One way to get a trained model from any source, with its thresholds and preprocessing.

    Args:
        spec: a training checkpoint file (``python -m ssod_zoo.app.train``), a hub-ready folder (``ssod save``,
            ``save_pretrained``) or ``local-dir:FOLDER``, ``hf-hub:org/repo``, or a registered ``ssod_<arch>.<tag>``.
            A plain timm model or folder is wrapped, its OOD head fresh (``ood_head_trained`` False).
        **kwargs: passed to ``timm.create_model`` for the folder, hub and tag forms.

    Returns:
        The model in eval mode; ``model.pretrained_cfg`` holds the input size, crop, mean and std it was trained
        with, so ``timm.data.resolve_data_config(model=model)`` gives its transform.
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        if kwargs:
            raise TypeError(f'load_model({spec!r}): a training checkpoint takes no model arguments, got {sorted(kwargs)}')
        return load_checkpoint(path)[0]
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            found = sorted(p.name for p in path.iterdir())[:5]
            raise WeightsError(
                f'{path} is a folder without {CONFIG_NAME} ({"it holds: " + ", ".join(found) if found else "empty"}),'
                ' so not a saved model: write one with ssod_zoo.save_pretrained or `ssod save CHECKPOINT DIR`; a '
                'training checkpoint is a file (e.g. runs/NAME/best.pt)')
        run = training_run(path)
        if run:
            raise WeightsError(run)
        spec = f'local-dir:{path}'
    elif not (spec.startswith(('hf-hub:', 'local-dir:')) or registered(spec)):
        raise WeightsError(f'{spec!r} is neither a file, a folder, an hf-hub:/local-dir: spec nor a registered model; '
                           f'SSOD models: {", ".join(timm.list_models("ssod_*"))}')
    try:
        model = timm.create_model(spec, pretrained=True, **kwargs)
    except LocalEntryNotFoundError as e:  # timm fetches an hf-hub: repo's config.json before ssod_zoo's code runs
        if not spec.startswith('hf-hub:'):
            raise
        raise not_cached(spec[len('hf-hub:'):], 'config.json', kwargs.get('cache_dir')) from e
    except NoDefaultWeights as e:  # an architecture's name, without weights of its own
        raise WeightsError(f'{spec} names an architecture without default weights: give weights instead, '
                           + (f'by their tagged name ({", ".join(e.tags)}), ' if e.tags else '')
                           + 'a checkpoint, a hub folder or hf-hub:ORG/REPO') from None
    if not isinstance(model, SSODModel):  # a plain timm classifier: its weights have no OOD head, so it is fresh
        model = wrap(model, ood_head_trained=False)
    labels = model.pretrained_cfg.get('label_names')
    if labels and model.num_classes not in (0, len(labels)):  # a wrapped timm model; SSOD ones: registry._create
        _forget_calibration(model, spec, len(labels))
    return model.eval()


def training_run(folder: Path) -> str:
    """What to say when ``folder`` is the ``--out-dir`` of a training run (its ``config.json`` is the run's, and
    it holds ``best.pt`` or ``last.pt``) rather than a saved model; '' otherwise."""
    checkpoints = [name for name in ('best.pt', 'last.pt') if (folder / name).is_file()]
    if not checkpoints or _saved_architecture(folder):
        return ''
    return (f'{folder} is a training run (ssod train --out-dir), not a saved model: pass its checkpoint, '
            f'{folder / checkpoints[0]}, or write a hub folder of it with `ssod save {folder / checkpoints[0]} DIR`')


def _saved_architecture(folder: Path) -> str:
    """The architecture a saved folder's ``config.json`` names; '' when it cannot be read (timm, reading it next,
    says what is wrong)."""
    try:
        return str(json.loads((folder / CONFIG_NAME).read_text(encoding='utf-8')).get('architecture') or '')
    except (OSError, ValueError, AttributeError):
        return ''


def saved_folder(spec: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The folder of an SSOD model as :func:`save_pretrained` wrote it (a ``config.json`` naming an ``ssod_*``
    architecture, ``model.safetensors``, and its card when it has one): a folder or ``local-dir:FOLDER`` itself, a
    registered ``ssod_<arch>.<tag>``'s shipped folder, or an ``hf-hub:org/repo`` snapshot in the Hugging Face cache
    (its files downloaded when not there). None for anything else: a training checkpoint, a plain timm model or
    folder, a tag without a saved folder."""
    spec = str(spec)
    if Path(spec).is_file():
        return None
    folder = Path(spec.removeprefix('local-dir:'))
    if spec.startswith('hf-hub:') or (not folder.is_dir() and registered(spec)):
        cfg = None if spec.startswith('hf-hub:') else timm.models.get_pretrained_cfg(spec)
        if cfg is not None and cfg.file and (Path(cfg.file).parent / CONFIG_NAME).is_file():
            folder = Path(cfg.file).parent
        else:
            repo = spec[len('hf-hub:'):] if cfg is None else cfg.hf_hub_id
            if not repo:
                return None
            folder = _download(repo, CONFIG_NAME, cache_dir).parent
            if not _saved_ssod(folder, weights=False):
                return None
            _download(repo, WEIGHTS_NAME, cache_dir)
            try:
                _download(repo, CARD_NAME, cache_dir)
            except WeightsError:
                pass  # a repo without a card: the copy gets one written from its config
    return folder if _saved_ssod(folder) else None


def _saved_ssod(folder: Path, weights: bool = True) -> bool:
    """Whether ``folder`` holds an SSOD model's ``config.json`` (and, with ``weights``, its safetensors file)."""
    return _saved_architecture(folder).startswith('ssod_') and (not weights or (folder / WEIGHTS_NAME).is_file())


def _forget_calibration(model: SSODModel, name: str, weights_classes: int) -> None:
    """timm reset the classifier for another class count than the weights': their label names and the spatial
    threshold and readout, calibrated on its logits, no longer apply. The OOD head is the weights' own, and so is
    its threshold, as after ``reset_classifier``."""
    warnings.warn(f'{name}: built with num_classes={model.num_classes}, the weights have {weights_classes} classes; '
                  'the classifier is new, so their label_names and spatial_threshold are dropped (train it, then '
                  'calibrate: ssod calibrate); the OOD head and its ood_threshold are the weights\' own',
                  stacklevel=user_stacklevel())
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != 'label_names'}
    model._forget_spatial_calibration()
