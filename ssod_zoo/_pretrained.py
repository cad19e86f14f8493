"""What ``pretrained=True`` runs for every ``ssod_*`` model (``registry._create``), and the shipped weights.

Before timm reads a weights file, :func:`_prepare_pretrained` resolves the source as timm will, downloads Hub files
with errors that name the remedy, and checks the file (safetensors complete, sha256 of shipped weights); timm's
``pretrained_filter_fn`` is :func:`_check_state_dict`, which refuses weights for another architecture, another class
count or without an OOD head, which timm's non-strict loading would let through. ``weights/manifest.json`` lists the
weights shipped inside the package; :func:`_manifest_cfgs` turns it into the registered ``ssod_<arch>.<tag>`` cfgs.

What is guaranteed for SSOD models (every ``ssod_*`` entrypoint goes through ``registry._create``):

* Nothing downloaded is ever unpickled. Weights from the Hub are read from ``model.safetensors`` only
  (``pretrained_cfg['hf_hub_filename']`` is forced to a ``.safetensors`` name, so timm's fallback from a
  missing ``model.safetensors`` to ``pytorch_model.bin`` + ``torch.load`` can never run; timm 1.0.31 takes
  that fallback even offline, because ``LocalEntryNotFoundError`` is an ``EntryNotFoundError``). A
  ``local-dir:`` folder must hold ``model.safetensors``. ``url`` sources are refused. Only a local file named
  explicitly (``pretrained_cfg_overlay=dict(file='run/last.pt')``) may be a pickle, and timm reads it with
  ``torch.load(weights_only=True)``. ``save_pretrained`` writes ``config.json`` with ``hf_hub_filename`` set,
  so even a plain timm without ssod_zoo's checks reads only the safetensors file from such a repo.
* Weights shipped in the package are checked against the sha256 and size in ``weights/manifest.json``.
* Failures raise :class:`WeightsError` naming the remedy: the Hub unreachable or offline with nothing cached,
  a repo / revision / file that does not exist, a truncated or corrupted safetensors file, a checkpoint for
  another architecture, for another class count, or without an OOD head (a plain timm classifier).

For ``hf-hub:`` names timm downloads ``config.json`` before any ssod_zoo code runs: ``hub.load_model`` (and so
every ``ssod`` command) turns that request's "not cached and unreachable" into the same :class:`WeightsError`;
``timm.create_model`` called directly gives huggingface_hub's own errors there (``LocalEntryNotFoundError``
"...check your connection", chained to ``OfflineModeIsEnabled`` "...unset HF_HUB_OFFLINE";
``RepositoryNotFoundError``; ``RevisionNotFoundError``). Everything after that, including the weights download,
is checked here.

Shipped weights
    ``weights/`` at the repository root holds ``manifest.json`` and one hub folder ``<arch>.<tag>/`` per
    weight. setup.cfg installs it as ``ssod_zoo/_weights`` (package data), and a source checkout or editable
    install reads it in place, so ``timm.create_model('ssod_<arch>.<tag>', pretrained=True)`` works offline from
    a clone. The registry registers a tag for every manifest entry at import, and no other tags.
    ``python weights/add_weight.py CHECKPOINT --tag TAG`` adds an entry.
"""
import hashlib
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import safetensors
import torch
from huggingface_hub import constants as hf_constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
    RepositoryNotFoundError, RevisionNotFoundError)
from timm.models import PretrainedCfg
from timm.models._builder import _resolve_pretrained_source
from timm.models._hub import hf_split
from torch import nn

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
MANIFEST_NAME = 'manifest.json'
MANIFEST_FORMAT = 'ssod_zoo.weights/1'
MAX_SHIPPED_BYTES = 25 * 1024 * 1024


class WeightsError(RuntimeError):
    """SSOD weights could not be found, read or used; the message names the remedy."""


class NoDefaultWeights(RuntimeError):
    """``pretrained=True`` on an architecture's bare name that has no default weights; ``tags``: its tagged
    weights (timm's error type, so code that catches timm's RuntimeError still does)."""

    def __init__(self, message: str, tags):
        super().__init__(message)
        self.tags = list(tags)


# ---------------------------------------------------------------------------------------------------------------
# loading: called by registry._create for every ssod_* model built with pretrained=True


def _prepare_pretrained(cfg: PretrainedCfg, cache_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Check the weights ``cfg`` points at before timm reads them; returns the overlay that keeps timm safe.

    Resolves the source exactly as timm will (its own ``_resolve_pretrained_source``), downloads Hub weights
    into the cache with clear errors, and checks the file: safetensors header and data complete, sha256 for
    shipped weights. timm then reads the same cached file.
    """
    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    overlay: Dict[str, Any] = {'custom_load': False}  # no model-specific loader: native state dicts only
    if load_from == 'hf-hub':
        repo, filename = loc if isinstance(loc, (tuple, list)) else (loc, None)
        filename = filename or WEIGHTS_NAME
        if not filename.endswith('.safetensors'):
            raise WeightsError(
                f'{repo}: hf_hub_filename={filename!r} is not a safetensors file, and SSOD models load nothing '
                f'else from the Hub (pickles run code). Publish model.safetensors with ssod_zoo.push_to_hub or '
                f'`ssod push`, and leave hf_hub_filename unset')
        overlay['hf_hub_filename'] = filename
        path = _download(repo, filename, cache_dir)
        _check_safetensors(path, f'{repo}/{filename}', remedy=(
            f'delete the cached copy ({path}) and download it again: '
            f'`hf download {hf_split(repo)[0]} {filename} --force-download`'))
    elif load_from == 'local-dir':
        folder = Path(loc)
        path = folder / WEIGHTS_NAME
        if not path.is_file():
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
            raise WeightsError(
                f'local-dir:{folder} has no {WEIGHTS_NAME} '
                f'({"folder does not exist" if found is None else "it holds: " + (", ".join(found) or "nothing")}). '
                'SSOD models load safetensors only; write the folder with ssod_zoo.save_pretrained or '
                '`ssod save <checkpoint> <dir>`, or load a local .pth explicitly with '
                'pretrained_cfg_overlay=dict(file=...)')
        _check_safetensors(path, str(path), remedy='write it again with `ssod save` or re-copy the folder')
    elif load_from == 'file':
        path = Path(loc)
        shipped = _SHIPPED_BY_FILE.get(str(path))
        if not path.is_file():
            remedy = ('reinstall ssod_zoo, or in a clone restore it with `git checkout -- weights/`'
                      if shipped else 'check the path given in pretrained_cfg_overlay=dict(file=...)')
            raise WeightsError(f'weights file {path} does not exist: {remedy}')
        if shipped:
            _verify_shipped(path, shipped)
        if path.suffix == '.safetensors':
            _check_safetensors(path, str(path), remedy='replace the file with an intact copy')
        # any other local file is read by timm with torch.load(weights_only=True)
    elif load_from == 'url':
        raise WeightsError(
            f'{cfg.url}: SSOD models do not load weights from URLs (torch.hub unpickles them). Publish them on '
            'the Hub as model.safetensors and use pretrained_cfg_overlay=dict(hf_hub_id=...), or download the '
            'file and pass pretrained_cfg_overlay=dict(file=...)')
    return overlay


def _download(repo: str, filename: str, cache_dir: Optional[Union[str, Path]]) -> Path:
    """``hf_hub_download`` with errors that say what to do."""
    repo_id, revision = hf_split(repo)
    at = f'{repo_id}@{revision}' if revision else repo_id
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    library_name='ssod_zoo'))
    except LocalEntryNotFoundError as e:
        raise not_cached(repo, filename, cache_dir) from e
    except GatedRepoError as e:
        raise WeightsError(f'{at} is gated: accept its terms on the Hub and log in (`hf auth login`)') from e
    except RepositoryNotFoundError as e:
        raise WeightsError(
            f'Hub repo {repo_id} does not exist or is private. Check the id (timm.list_pretrained("ssod_*") lists '
            'the published SSOD weights); for a private repo log in with `hf auth login` or set HF_TOKEN') from e
    except RevisionNotFoundError as e:
        raise WeightsError(
            f'Hub repo {repo_id} has no revision {revision!r}. Use an existing branch, tag or commit after "@" '
            f'(HfApi().list_repo_refs("{repo_id}") lists them), or drop "@{revision}" for the main branch') from e
    except EntryNotFoundError as e:
        raise WeightsError(
            f'{at} has no {filename}. SSOD models load safetensors only; publish the weights with '
            'ssod_zoo.push_to_hub or `ssod push <checkpoint> <repo_id>`, which upload model.safetensors') from e
    except (HfHubHTTPError, OfflineModeIsEnabled) as e:
        raise WeightsError(f'{at}: the Hub request for {filename} failed ({e}). Retry later, check the network '
                           'and HF_ENDPOINT, or load a saved folder with "local-dir:<folder>"') from e


def not_cached(repo: str, filename: str, cache_dir: Optional[Union[str, Path]] = None) -> WeightsError:
    """The error for a Hub file that is neither cached nor reachable, with what to do."""
    repo_id, revision = hf_split(repo)
    at = f'{repo_id}@{revision}' if revision else repo_id
    offline = hf_constants.is_offline_mode()
    cache = cache_dir or hf_constants.HF_HUB_CACHE
    why = ('offline mode is on (HF_HUB_OFFLINE=1)' if offline else
           'the Hub cannot be reached (no network, proxy, or HF_ENDPOINT down)')
    return WeightsError(
        f'{at}: {filename} is not in the Hugging Face cache ({cache}) and {why}. Remedy: '
        f'{"unset HF_HUB_OFFLINE and " if offline else ""}download it once with network access '
        f'(`hf download {repo_id}{" --revision " + revision if revision else ""}`), copy a cache that holds it '
        f'and point HF_HUB_CACHE at it, or load a saved folder with timm.create_model("local-dir:<folder>", '
        'pretrained=True)')


def _check_safetensors(path: Path, what: str, remedy: str) -> None:
    """Header parses and the file holds every byte the header promises (catches truncation and header damage)."""
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            keys = list(f.keys())
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f'{what} is truncated or corrupted ({e}); {remedy}') from e
    if not keys:
        raise WeightsError(f'{what} holds no tensors; {remedy}')


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _verify_shipped(path: Path, entry: Mapping[str, Any]) -> None:
    size, sha = path.stat().st_size, _sha256(path)
    if sha != entry['sha256'] or size != entry['size']:
        pointer = ' It looks like a Git LFS pointer: run `git lfs pull`.' if size < 1024 else ''
        raise WeightsError(
            f'{path} ({size} bytes, sha256 {sha}) is not the file {entry["name"]} was published with '
            f'({entry["size"]} bytes, sha256 {entry["sha256"]} in {MANIFEST_NAME}): it is corrupted or was '
            f'replaced.{pointer} Restore it with `git checkout -- weights/` or reinstall ssod_zoo')


def _check_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: refuse weights for another architecture, class count, or without OOD head."""
    cfg = model.pretrained_cfg
    arch = cfg.get('architecture') or type(model).__name__
    has_ood_head = any(k.startswith('ood_head.') for k in state_dict)
    # timm discards the classifier itself when the model was asked for another class count than the weights'
    head_dropped = model.num_classes != cfg.get('num_classes')
    heads = _head_keys(cfg)
    if has_ood_head:
        problem = _state_dict_mismatch(state_dict, model, head_dropped=head_dropped)
    else:  # a plain classifier checkpoint is said to be one first (its classifier may not fit either: that is
        # not what to fix), unless it is not even this architecture's
        problem = _state_dict_mismatch({k: v for k, v in state_dict.items() if k not in heads}, model,
                                       head_dropped=True, ood_head=False)
    if problem:
        raise WeightsError(problem)
    if not has_ood_head:
        classifier = min(heads, default='fc.').rsplit('.', 1)[0]
        raise WeightsError(
            f'the weights for {arch} have no "ood_head.*" tensors: they are a plain timm classifier checkpoint, '
            'not SSOD weights, and the OOD head would stay untrained. To start SSOD training from them, create '
            'the model with pretrained=False and load them with model.load_state_dict(state_dict, strict=False) '
            f'(for another class count, without the classifier\'s "{classifier}.*" tensors), or pass the file to '
            '`ssod train --init`, which does both')
    return state_dict


def _head_keys(cfg: Mapping[str, Any]) -> set:
    """The classifier's tensors, by the pretrained config's ``classifier`` name(s)."""
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    return {f'{c}.{p}' for c in classifiers for p in ('weight', 'bias')}


def _state_dict_mismatch(state_dict: Mapping[str, torch.Tensor], model: nn.Module, head_dropped: bool,
                         ood_head: bool = True) -> str:
    """'' if ``state_dict`` fits ``model``, else a message saying which model the weights need.

    ``head_dropped``: the classifier's tensors are not compared (timm drops them); ``ood_head=False``: nor the
    OOD head's (the caller reports its absence).
    """
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    arch = cfg.get('architecture') or type(model).__name__
    head_keys = _head_keys(cfg)
    first_convs = cfg.get('first_conv') or ()
    first_convs = {f'{c}.weight' for c in ((first_convs,) if isinstance(first_convs, str) else first_convs)}
    expected = model.state_dict()

    if head_dropped and head_keys and all(k in state_dict and k in expected and
                                          tuple(state_dict[k].shape) == tuple(expected[k].shape) for k in head_keys):
        n = model.num_classes
        return (f'the weights\' classifier fits {arch} as built ({n} classes), but their pretrained_cfg says '
                f'{cfg.get("num_classes")} classes, so timm would discard the trained classifier. Say so for the '
                f'weights too: pretrained_cfg_overlay=dict(..., num_classes={n})')
    skip = set(head_keys) if head_dropped else set()
    if not ood_head:
        skip |= {k for k in expected if k.startswith('ood_head.')}
    missing = [k for k in expected if k not in state_dict and k not in skip]
    unexpected = [k for k in state_dict if k not in expected and k not in skip]  # num_classes=0: no classifier
    head_shape, other_shape = [], []
    for k, v in state_dict.items():
        if k in expected and k not in skip and tuple(v.shape) != tuple(expected[k].shape):
            if k in first_convs and v.ndim == 4 and v.shape[0] == expected[k].shape[0]:
                continue  # timm adapts the stem to another in_chans
            (head_shape if k in head_keys else other_shape).append(k)

    if missing or unexpected or other_shape:
        parts = []
        if missing:
            parts.append(f'{len(missing)} tensors missing (e.g. {", ".join(missing[:3])})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {", ".join(unexpected[:3])})')
        if other_shape:
            k = other_shape[0]
            parts.append(f'{len(other_shape)} of another shape (e.g. {k}: weights {tuple(state_dict[k].shape)}, '
                         f'model {tuple(expected[k].shape)})')
        return (f'the weights are not for {arch} as built ({"; ".join(parts)}): they were saved from another '
                'architecture or other model arguments (output_stride, global_pool, ...). Load them through '
                'their own config.json, which names both: timm.create_model("hf-hub:<repo>") or '
                '"local-dir:<folder>", or create the architecture they were trained as')
    if head_shape:
        k = sorted(head_shape)[0]
        n_weights, n_model = state_dict[k].shape[0], expected[k].shape[0]
        return (f'the weights are for {n_weights} classes but {arch} was built for {n_model} ({k}: weights '
                f'{tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}). Create the model with '
                f'num_classes={n_weights} and say so for the weights too: '
                f'pretrained_cfg_overlay=dict(..., num_classes={n_weights}); '
                'or load it as "hf-hub:<repo>" / "local-dir:<folder>", whose config.json gives both')
    return ''


@contextmanager
def _clear_errors(what: str) -> Iterator[None]:
    """Errors that can still surface while timm reads the checked file (e.g. it changed in between)."""
    try:
        yield
    except safetensors.SafetensorError as e:
        raise WeightsError(f'{what}: the weights file is truncated or corrupted ({e}); download or copy it '
                           'again') from e
    except (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled) as e:
        raise WeightsError(f'{what}: reading the weights from the Hub failed ({type(e).__name__}: {e}); check '
                           'the network or HF_HUB_OFFLINE and the Hugging Face cache, or load a saved folder '
                           'with "local-dir:<folder>"') from e


# ---------------------------------------------------------------------------------------------------------------
# weights shipped in the package: weights/manifest.json, registered by registry.py at import


_SHIPPED: Dict[str, Dict[str, Any]] = {}  # 'arch.tag' -> manifest entry, with 'path' the absolute file (or None)
_SHIPPED_BY_FILE: Dict[str, Dict[str, Any]] = {}  # absolute file path -> manifest entry


def _weights_dir() -> Optional[Path]:
    """Installed wheel: ``ssod_zoo/_weights``; source checkout or editable install: ``<repo>/weights``."""
    here = Path(__file__).resolve().parent
    for folder in (here / '_weights', here.parent / 'weights'):
        manifest = folder / MANIFEST_NAME
        if manifest.is_file():
            return folder
    return None


def _read_manifest(folder: Path) -> List[Dict[str, Any]]:
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding='utf-8'))
    if not isinstance(manifest, dict) or manifest.get('format') != MANIFEST_FORMAT:
        raise ValueError(f'{folder / MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest')
    return list(manifest.get('weights') or [])


def _manifest_cfgs(arch_cfgs: Mapping[str, Mapping[str, Any]],
                   folder: Optional[Path] = None) -> Dict[str, Dict[str, Any]]:
    """``{'arch.tag': pretrained cfg}`` for ``generate_default_cfgs``, one per manifest entry, no other.

    A shipped file that is present becomes ``file`` (loaded offline, sha256-checked); without it the entry
    falls back to its ``hf_hub_id``; with neither, ``file`` stays, so loading says the file is missing.
    Never raises: a broken manifest must not break ``import timm``.
    """
    folder = folder if folder is not None else _weights_dir()
    if folder is None:
        return {}
    try:
        entries = _read_manifest(folder)
    except (OSError, ValueError) as e:
        warnings.warn(f'ssod_zoo: ignoring the weights manifest ({e}); no SSOD weight tags are registered')
        return {}
    fields = set(PretrainedCfg.__dataclass_fields__)
    cfgs = {}
    for entry in entries:
        arch, tag = entry.get('architecture'), entry.get('tag')
        if (arch not in arch_cfgs or not tag or not (entry.get('file') or entry.get('hf_hub_id'))
                or (entry.get('file') and not (entry.get('sha256') and entry.get('size')))):
            warnings.warn(f'ssod_zoo: manifest entry {entry.get("name")!r} needs a registered architecture, a '
                          'tag, and a file (with sha256 and size) or an hf_hub_id; skipped')
            continue
        path = (folder / entry['file']).resolve() if entry.get('file') else None
        cfg = {**arch_cfgs[arch],
               **{k: tuple(v) if isinstance(v, list) else v
                  for k, v in (entry.get('pretrained_cfg') or {}).items() if k in fields},
               'hf_hub_id': entry.get('hf_hub_id'), 'hf_hub_filename': WEIGHTS_NAME,
               'file': str(path) if path is not None and (path.is_file() or not entry.get('hf_hub_id')) else None,
               'source': None, 'architecture': None, 'tag': None}
        entry = {**entry, 'path': path}
        _SHIPPED[f'{arch}.{tag}'] = entry
        if path is not None:
            _SHIPPED_BY_FILE[str(path)] = entry
        cfgs[f'{arch}.{tag}'] = cfg
    return cfgs


def _folder_config(cfg: PretrainedCfg, cache_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """The ``config.json`` saved beside the weights ``cfg`` points at: a ``local-dir:`` folder's, an ``hf-hub:``
    repo's, or a shipped tag's folder; {} when there is none or it cannot be read (the weights' own checks say what
    is wrong with the folder or repo)."""
    try:
        if getattr(cfg, 'source', None) == 'local-dir' and cfg.file and Path(cfg.file).is_dir():
            path = Path(cfg.file) / CONFIG_NAME
        elif cfg.file and str(cfg.file) in _SHIPPED_BY_FILE:  # a shipped tag's folder, not a user's file= overlay
            path = Path(cfg.file).parent / CONFIG_NAME
        elif cfg.hf_hub_id:
            path = Path(_download(cfg.hf_hub_id, CONFIG_NAME, cache_dir))
        else:
            return {}
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError, WeightsError):
        return {}
    return config if isinstance(config, dict) else {}


def _repo_model_args(cfg: PretrainedCfg, cache_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Model arguments (the thresholds, ``output_stride``, ...) saved in the ``config.json`` of the Hub repo a
    registered architecture is pointed at with ``pretrained_cfg_overlay=dict(hf_hub_id=...)``. Without them the
    weights would load, without an error, into another model: other logits and no thresholds."""
    repo = cfg.hf_hub_id
    try:
        path = _download(repo, CONFIG_NAME, cache_dir)
    except WeightsError as e:
        cause = e.__cause__
        if isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):
            raise WeightsError(
                f'{repo} has no {CONFIG_NAME}, so the model arguments and thresholds its weights were saved with '
                'are unknown. Publish the weights with ssod_zoo.push_to_hub or `ssod push <checkpoint> <repo_id>`, '
                f'which write {CONFIG_NAME}, or load a local copy with pretrained_cfg_overlay=dict(file=...) and '
                'the model arguments given explicitly') from cause
        raise
    try:
        config = json.loads(Path(path).read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise WeightsError(f'{repo}/{CONFIG_NAME} is not readable JSON ({e}); download it again: '
                           f'`hf download {hf_split(repo)[0]} {CONFIG_NAME} --force-download`') from e
    arch = cfg.architecture or ''
    if config.get('architecture') and arch and config['architecture'] != arch:
        raise WeightsError(f'{repo} holds {config["architecture"]} weights, not {arch}: create '
                           f'timm.create_model("hf-hub:{repo}", pretrained=True), or the architecture it names')
    return dict(config.get('model_args') or {})


def _shipped_model_args(variant: str, tag: Optional[str]) -> Dict[str, Any]:
    """Model arguments a registered weight was saved with (the thresholds, ``output_stride``, ...)."""
    entry = _SHIPPED.get(f'{variant}.{tag}') if tag else None
    return dict(entry.get('model_args') or {}) if entry else {}
