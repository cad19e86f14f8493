"""The spatial-head adapter: turns any timm CNN classifier into an SSOD model.

SSOD (Pei, "Image Background Serves as Good Proxy for Out-of-distribution Data", Sec. 2.3) needs three things
from a classifier: the feature map X = h(x), the classification head applied at every position of X, and a
small binary OOD head applied at every position (for training) and on the pooled features (Eq. 15, for
inference). This module adds exactly that to a timm model and nothing else.

The SSOD model *is* the timm model: ``wrap`` gives it a subclass of its own class with :class:`SSODModel`
mixed in and one extra module, ``ood_head``. Everything timm code relies on therefore keeps working
unchanged: state-dict key names, ``group_matcher``/``no_weight_decay``, ``feature_info`` and
``features_only``, ``set_grad_checkpointing``, and ``isinstance(model, timm.models.ResNet)``.

The per-position head is the model's own ``forward_head(..., pre_logits=True)`` applied to every position of
X as a 1x1 map, then the classifier. Pooling a 1x1 map is the identity, so whatever a model puts between
pooling and the classifier (MobileNetV3's ``conv_head`` + activation, ConvNeXt's norm) is honoured with no
per-architecture code.
"""
import copy
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Final, List, NamedTuple, Optional, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.models import MobileNetV3
from torch import nn

from .output import SPATIAL_K, SpatialOutput, SSODOutput, SSODScores, spatial_maxlogit_score

__all__ = ['SSODModel', 'UntrainedOODHeadWarning', 'wrap']


class UntrainedOODHeadWarning(UserWarning):
    """``forward``/``forward_ssod`` of a model whose OOD head was never trained (``ood_head_trained`` False, a
    cross-entropy model): the ``ood_factor`` they return means nothing."""


# index of "in-distribution" in the 2-way OOD head (paper Eq. 12: y_ood = 1 for ID patches)
ID_INDEX: Final[int] = 1

_SSOD_CLASSES: Dict[type, type] = {}
# |values| above this are no normalised image (ImageNet mean/std map [0, 1] pixels into about [-2.2, 2.7])
_MAX_NORMALISED: Final[float] = 20.0
_SPATIAL_OK: Dict[type, bool] = {}  # model classes already probed for a (B, C, H, W) feature map


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float, if it is one ``ood_factor`` can be compared with: in [0, 1]."""
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'ood_threshold must be in [0, 1], as ood_factor is, got {threshold}: outside it every image '
                         'is kept or every one rejected; calibrate one with ssod_zoo.calibrate_threshold(ood_factors)')
    return value


def check_spatial_threshold(threshold: float) -> float:
    """``threshold`` as a float, if it is one a :meth:`SSODModel.spatial_score` can be compared with: finite."""
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f'spatial_threshold must be a finite logit value, got {threshold}; calibrate one with '
                         'ssod_zoo.calibrate_threshold(model.spatial_score(id_validation_images))')
    return value


def user_stacklevel() -> int:
    """The ``stacklevel`` for a warning issued by the caller of this function that points at the first frame outside
    ssod_zoo, timm and torch: the user's line, however deep in the libraries the warning was raised."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


_LIBRARY_DIRS = tuple(str(Path(m.__file__).parent) + os.sep for m in (sys.modules[__package__], timm, torch))


def _warn_no_head(stacklevel: int) -> None:
    warnings.warn('loading a checkpoint without an OOD head (no "ood_head.*" keys): backbone and classifier are '
                  'loaded, the OOD head keeps its fresh initialisation (model.ood_head_trained is now False) and must '
                  'be trained (python -m ssod_zoo.app.train) before ood_factor means anything', stacklevel=stacklevel)


class Readout(NamedTuple):
    """A score a deployment thresholds: the model attribute holding its calibrated threshold, the score's name (a
    :class:`~ssod_zoo.SSODScores` field) and the check a threshold on it must pass."""
    attribute: str
    score: str
    check: Callable[[float], float]


# the readouts accepts(), ssod predict's threshold rules, the cards, reports and exports know, spatial first (the
# default); every table of thresholds in the package derives from this one
READOUTS: Dict[str, Readout] = {
    'spatial': Readout('spatial_threshold', 'spatial_score', check_spatial_threshold),
    'factor': Readout('ood_threshold', 'ood_factor', check_threshold),
}


def check_readout(readout: str) -> str:
    """``readout`` if it names one of :data:`READOUTS`."""
    if readout not in READOUTS:
        raise ValueError(f"readout is one of {', '.join(map(repr, READOUTS))}, got {readout!r} (a hub folder keeps "
                         "it in config.json, model_args.readout; `ssod calibrate FOLDER --ood-dirs ...` sets it)")
    return readout


# the attributes that hold for the weights they were calibrated on: the thresholds and the readout chosen for them
CALIBRATED = (*(r.attribute for r in READOUTS.values()), 'readout')


def _require_pooled(pooled: torch.Tensor) -> None:
    if not torch.jit.is_scripting():  # (TorchScript compiles no fx)
        if isinstance(pooled, torch.fx.Proxy):  # symbolic tracing (feature extraction): no shape to check
            return
    if pooled.ndim != 2:
        raise RuntimeError(
            'the OOD factor needs pooled features, but this model has no global pooling (global_pool="", as '
            'reset_classifier(n, "") and timm\'s prune_intermediate_layers() leave it): use forward_spatial() for '
            'per-position outputs (with a classifier), forward_intermediates() or return_ood=False (timm\'s own '
            'forward) for features, or prune with prune_head=False to keep the logits and the OOD factor')


class SSODModel(nn.Module):
    """Mixin that makes a timm CNN classifier an SSOD model. Build one with :func:`wrap` or ``timm.create_model``.

    ``forward(x)`` returns :class:`SSODOutput` ``(logits, ood_factor)``; with ``return_ood=False`` it returns the
    plain logits tensor, exactly as the timm model does, and :meth:`forward_ssod` still gives both.

    Attributes:
        ood_head: ``nn.Linear(head_hidden_size, 2)``, the binary ID/OOD head f_ood; index 1 is "in-distribution".
        return_ood: whether ``forward`` returns :class:`SSODOutput` (True) or the logits tensor (False).
        ood_threshold: the calibrated rejection threshold on ``ood_factor`` (keeps 95% of ID validation images),
            or None if the model was never calibrated. Decide with :meth:`accepts`.
        spatial_threshold: the same for :meth:`spatial_score`, the readout this project's study found to detect
            best (the mean MaxLogit of the 3 best feature-map positions), or None. Decide with
            ``accepts(score, readout='spatial')``.
        readout: the readout chosen for these weights on OOD validation images (``'spatial'`` or ``'factor'``,
            which one detected better; ``ssod calibrate --ood-dirs`` sets it), or None when none was chosen:
            ``ssod predict`` then decides with the spatial one, the study's default.
        ood_head_trained: False for weights trained with cross-entropy alone (``--ce-only``, the twin SSOD is
            compared with), whose OOD head was never trained: ``forward`` and :meth:`forward_ssod` still return an
            ``ood_factor``, with an :class:`UntrainedOODHeadWarning`, :meth:`forward_scores` gives NaN for it,
            :meth:`accepts` refuses the ``'factor'`` readout, and ``ssod predict`` leaves the columns built on it
            empty. True otherwise, also for a model not trained at all yet: the flag says what the weights were
            trained for, not whether they were.
        check_finite: (default True) eager forwards reject inputs with NaN/Inf values, and warn once about values
            far outside a normalised image's range (0-255 pixels); set False to skip that pass over the input (and
            its device sync) for throughput. Skipped anyway under torch.compile/export.
    """
    return_ood: Final[bool]
    __jit_unused_properties__ = ['_model_args']  # TorchScript compiles properties unless told not to

    @property
    def _model_args(self) -> Dict[str, Any]:
        """timm's record of the arguments that rebuild the model (``save_for_hf`` writes it as ``model_args``), with
        the calibration as the model holds it now rather than as it was built: a model without the folder's weights,
        with a new classifier or with its calibration dropped must not write the old thresholds and readout."""
        args = dict(self.__dict__.get('_built_args', {}))
        for key in CALIBRATED:
            if key in args or getattr(self, key, None) is not None:
                args[key] = getattr(self, key, None)
        return args

    @_model_args.setter
    def _model_args(self, value: Dict[str, Any]) -> None:
        self.__dict__['_built_args'] = dict(value)

    def forward(self, x: torch.Tensor):
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input(x, positions=self.return_ood)  # drop-in mode takes what the plain timm model takes
            if self.return_ood:
                self._warn_untrained_head(stacklevel=5)  # the caller of model(x), through nn.Module.__call__
        if self.return_ood:
            return self._forward_ssod(x)  # checked once, above
        return self.forward_head(self.forward_features(x))

    def accepts(self, score: Union[SSODScores, torch.Tensor], threshold: Optional[float] = None,
                readout: Optional[str] = None) -> torch.Tensor:
        """Which images count as one of the known classes: ``score >= threshold``.

        Args:
            score: :class:`SSODScores` from :meth:`forward_scores`, decided by ``readout``'s score, or one (B,)
                score: ``ood_factor`` from :meth:`forward_ssod` (``readout='factor'``, the paper's Eq. 15) or
                :meth:`spatial_score` (``readout='spatial'``, the readout the study found to detect best).
            threshold: default the readout's calibrated threshold, ``model.ood_threshold`` or
                ``model.spatial_threshold``, each set to keep 95% of ID validation images.
            readout: ``'factor'`` or ``'spatial'``: which score decides. Default for :class:`SSODScores`:
                ``model.readout``, the one chosen for the weights (``'spatial'`` if none was); for a tensor:
                ``'factor'``, so the tensor is ``ood_factor``.

        Returns:
            (B,) bool, True = in-distribution (keep), False = unknown.
        """
        if isinstance(score, torch.Tensor):
            score = score.detach()  # a decision, not a graph: scores from a forward outside no_grad are fine
        if isinstance(score, SSODScores):
            readout = readout or getattr(self, 'readout', None) or 'spatial'
            score = getattr(score, READOUTS[check_readout(readout)].score)
        elif not isinstance(score, torch.Tensor):
            raise TypeError(f'accepts() takes model.forward_scores(x) or one (B,) score tensor, got '
                            f'{type(score).__name__}' + (' (pass model.forward_scores(x), or out.ood_factor)'
                                                         if isinstance(score, SSODOutput) else ''))
        elif readout in (None, 'factor') and not getattr(self, 'ood_head_trained', True):
            pass  # refused below, for what it is
        elif readout in (None, 'factor') and score.numel() and not 0.0 <= float(score.min()) <= float(
                score.max()) <= 1.0:
            how = 'a bare tensor' if readout is None else "a tensor with readout='factor'"
            raise ValueError(f"accepts() reads {how} as ood_factor, which lies in [0, 1], and these scores do not: "
                             "for a spatial_score pass readout='spatial', or pass model.forward_scores(x), which "
                             "decides with model.readout")
        readout = readout or 'factor'
        if readout == 'factor' and not getattr(self, 'ood_head_trained', True):
            raise ValueError("this model's OOD head was never trained (a cross-entropy model), so its ood_factor "
                             "means nothing: decide with the spatial score, accepts(scores) or "
                             "accepts(model.spatial_score(x), readout='spatial')")
        attribute, _, check = READOUTS[check_readout(readout)]
        threshold = getattr(self, attribute, None) if threshold is None else threshold
        if threshold is None:
            scores = 'ood_factors' if readout == 'factor' else 'model.spatial_score(images)'
            raise ValueError(f'this model has no calibrated {attribute}: pass threshold=..., or calibrate one on '
                             f'ID validation images with ssod_zoo.calibrate_threshold({scores}) and set '
                             f'model.{attribute} (or run `ssod calibrate MODEL --val-dir DIR`)')
        return score >= check(threshold)

    @torch.jit.unused
    def spatial_score(self, x: torch.Tensor, k: int = SPATIAL_K) -> torch.Tensor:
        """The readout this project's study found to detect best: the classifier read where the object is, the
        mean MaxLogit of the ``k`` best feature-map positions (:func:`ssod_zoo.spatial_maxlogit_score`).

        Args:
            x: (B, C, H, W) float image batch, normalised with the model's mean/std.
            k: positions averaged; ``model.spatial_threshold`` was calibrated with 3.

        Returns:
            (B,) float32, higher = more in-distribution; keep where ``score >= model.spatial_threshold``
            (:meth:`accepts` with ``readout='spatial'``).
        """
        self._check_input(x)
        self._warn_if_training('spatial_score')
        self._require_classifier('spatial_score')
        cls_map, _ = self._heads_without_autocast(self.forward_positions, self.forward_features(x))
        return spatial_maxlogit_score(cls_map, k=k)

    @torch.jit.unused
    def forward_scores(self, x: torch.Tensor) -> SSODScores:
        """Class logits, ``ood_factor`` and :meth:`spatial_score` from one pass of the backbone: what
        ``ssod predict`` and the ONNX export decide with.

        Args:
            x: (B, C, H, W) float image batch, normalised with the model's mean/std.

        Returns:
            SSODScores ``(logits, ood_factor, spatial_score)``; ``ood_factor`` is NaN when the OOD head was never
            trained (``ood_head_trained`` False).
        """
        self._check_input(x)
        self._warn_if_training('forward_scores')
        self._require_classifier('forward_scores')
        features = self.forward_features(x)
        pooled = self.forward_head(features, pre_logits=True)
        _require_pooled(pooled)
        cls_map, _ = self._heads_without_autocast(self.forward_positions, features)
        factor = self.forward_ood(pooled)
        if not getattr(self, 'ood_head_trained', True):
            factor = torch.full_like(factor, float('nan'))  # no OOD factor: the head was never trained
        return SSODScores(self._classify(pooled), factor, spatial_maxlogit_score(cls_map))

    @torch.jit.export  # scripted models keep it: forward() reaches only _forward_ssod
    def forward_ssod(self, x: torch.Tensor) -> SSODOutput:
        """Class logits and OOD factor, whatever ``return_ood`` says.

        Args:
            x: (B, C, H, W) float image batch, normalised with the model's mean/std.

        Returns:
            SSODOutput with ``logits`` (B, M) and ``ood_factor`` (B,) in [0, 1] (paper Eq. 15).
        """
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input(x)
            self._warn_untrained_head(stacklevel=3)
        return self._forward_ssod(x)

    @torch.jit.unused
    def _warn_untrained_head(self, stacklevel: int) -> None:
        if not getattr(self, 'ood_head_trained', True) and not torch.compiler.is_compiling():
            warnings.warn("this model's OOD head was never trained (ood_head_trained is False: weights trained with "
                          "cross-entropy alone), so the ood_factor it returns means nothing. Decide with "
                          "model.accepts(model.forward_scores(x)) (the spatial score), or create the model with "
                          "return_ood=False for the logits alone", UntrainedOODHeadWarning, stacklevel=stacklevel)

    def _forward_ssod(self, x: torch.Tensor) -> SSODOutput:
        features = self.forward_features(x)
        pooled = self.forward_head(features, pre_logits=True)
        _require_pooled(pooled)
        if torch.jit.is_scripting():
            logits = self.forward_head(features)
        else:
            logits = self._classify(pooled)
        return SSODOutput(logits, self.forward_ood(pooled))

    @torch.jit.unused
    def _classify(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """Logits from pooled pre-logits: the last step of ``forward_head`` (timm's heads return pre-logits right
        before the classifier, dropout included), so one pass of the head serves the logits and the OOD head
        (MobileNetV3's ``conv_head`` sits in that pass) and the logits are bit for bit timm's."""
        return self.get_classifier()(pre_logits)

    def forward_ood(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """The OOD factor from pooled pre-logits features (Eq. 15).

        Args:
            pre_logits: (B, head_hidden_size), i.e. ``forward_head(forward_features(x), pre_logits=True)``.

        Returns:
            (B,) float32 in [0, 1], P(x in S_ID | x): the softmax over the OOD head's (OOD, ID) logits, ID column.
        """
        # float32 even under autocast, the head's product and the difference too: bf16 resolves only ~0.004 near 1
        # (and rounds the difference of two logits), too coarse against a calibrated threshold
        if torch.jit.is_scripting():
            ood_logits = self.ood_head(pre_logits).float()
        else:
            ood_logits = self._heads_without_autocast(self.ood_head, pre_logits).float()
        return torch.sigmoid(ood_logits[:, 1] - ood_logits[:, 0])  # ID_INDEX = 1

    @torch.jit.unused
    def _heads_without_autocast(self, heads: Callable[[torch.Tensor], Any], features: torch.Tensor) -> Any:
        """``heads(features)`` in the weights' own precision whatever the autocast: the scores a threshold is
        calibrated on (``collect`` computes them so) are not rounded to bf16 (the spatial score by up to 0.14 on the
        demo model); outside autocast, exactly ``heads(features)`` (and under torch.fx, whose features are proxies)."""
        if not isinstance(features, torch.Tensor) or not torch.is_autocast_enabled(features.device.type):
            return heads(features)
        with torch.autocast(features.device.type, enabled=False):
            return heads(features.to(self.ood_head.weight.dtype))

    @torch.jit.unused
    def forward_spatial(self, x: torch.Tensor) -> SpatialOutput:
        """Pooled and per-position outputs of both heads: what the SSOD objective trains on.

        Args:
            x: (B, C, H, W) float image batch.

        Returns:
            SpatialOutput: ``features`` (B, C, h, w), ``logits`` (B, M), ``ood_logits`` (B, 2),
            ``cls_map`` (B, M, h, w), ``ood_map`` (B, 2, h, w).
        """
        self._check_input(x)
        features = self.forward_features(x)
        if features.ndim != 4:
            raise RuntimeError(
                f'{type(self).__name__} gives a {features.ndim}-D feature map {tuple(features.shape)}; '
                'SSOD samples patches from a (B, C, H, W) map, so it needs a CNN')
        self._require_classifier('SSOD training, which samples patches with the classification head,')
        pooled = self.forward_head(features, pre_logits=True)
        logits = self._classify(pooled)  # one pass of the pooled head for both heads
        cls_map, ood_map = self.forward_positions(features)
        return SpatialOutput(features=features, logits=logits, ood_logits=self.ood_head(pooled), cls_map=cls_map,
                             ood_map=ood_map)

    @torch.jit.unused
    def forward_positions(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both heads at every position of a feature map (Eq. 13): each position is passed through the model's
        own ``forward_head(pre_logits=True)`` as a 1x1 map, then the classifier and the OOD head.

        Args:
            features: (B, C, h, w), ``forward_features(x)``.

        Returns:
            ``cls_map`` (B, M, h, w) and ``ood_map`` (B, 2, h, w).
        """
        b, c, h, w = features.shape
        # the head's BatchNorm layers (MobileNetV4's norm_head, RepViT's classifier, EfficientViT's head conv)
        # normalise the positions with the pooled features' running statistics and leave them alone: in train mode
        # they would use the positions' own and update their statistics a second time with them, so that the pooled
        # inference they serve in eval mode would read polluted ones
        frozen = [m for head in self._head_modules() for m in head.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in frozen:
            m.eval()
        try:
            pre_logits = self._pre_logits_at_positions(features)
            cls, ood = self.get_classifier()(pre_logits), self.ood_head(pre_logits)
        finally:
            for m in frozen:
                m.train()

        def as_map(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, h, w, t.shape[-1]).permute(0, 3, 1, 2)  # not -1: an empty batch has none to infer

        return as_map(cls), as_map(ood)

    @torch.jit.unused
    def _head_modules(self) -> List[nn.Module]:
        """The modules a pass of the head runs: the top-level ones the classifier sits in (timm's
        ``pretrained_cfg['classifier']``), and MobileNetV3's per-position layers."""
        names = (getattr(self, 'pretrained_cfg', None) or {}).get('classifier') or ()
        tops = dict.fromkeys(n.split('.')[0] for n in ((names,) if isinstance(names, str) else names))
        heads = [getattr(self, t) for t in tops if isinstance(getattr(self, t, None), nn.Module)]
        return heads + ([self.norm_head] if _head_is_per_position(self) else [])

    @torch.jit.unused
    def _pre_logits_at_positions(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_head(pre_logits=True)`` at every position of ``features`` (B, C, h, w): (B*h*w, D)."""
        b, c, h, w = features.shape
        if _head_is_per_position(self):
            # MobileNetV3 pools first, then conv_head + norm + activation act on each position alone: run them on
            # all B*h*w positions at once, the 1x1 convolution as the one matrix product it is (the same numbers;
            # on CPU its backward skips the convolution kernel's, benchmarks/results/mobilenetv3_issue11.md), then
            # the head's own dropout, as forward_head applies it
            x = features.permute(0, 2, 3, 1).reshape(b * h * w, c)
            x = F.linear(x, self.conv_head.weight.flatten(1), self.conv_head.bias)[:, :, None, None]
            pre_logits = self.act2(self.norm_head(x)).flatten(1)
            if self.drop_rate > 0.:
                pre_logits = F.dropout(pre_logits, p=self.drop_rate, training=self.training)
            return pre_logits
        positions = features.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
        return self.forward_head(positions, pre_logits=True).flatten(1)

    def __reduce_ex__(self, protocol):
        # Pickle a generated SSOD<Base> as "SSOD of <Base>", with <Base> by reference: whole-model pickles
        # (torch.save(model), multiprocessing spawn, Ray) load in any interpreter, for any importable base class.
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        if _SSOD_CLASSES.get(cls.__bases__[-1]) is not cls or not isinstance(reduced, tuple):
            return reduced  # a user's own subclass: pickled by its own name
        return (_new_ssod_instance, (cls.__bases__[-1],), *reduced[2:])

    @torch.jit.unused
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, **kwargs: Any) -> None:
        # kwargs: the trunk's own, e.g. ConvNeXt's reset_other, which timm's feature and pruning code passes
        head = self.ood_head
        if global_pool is None:
            super().reset_classifier(num_classes, **kwargs)
        else:
            super().reset_classifier(num_classes, global_pool, **kwargs)
        self._fit_ood_head()
        self._forget_spatial_calibration()  # set on the old classifier's logits, which are gone
        if global_pool is not None or any(kwargs.values()):  # other pooled features (another pooling, or the
            # trunk's own reset of the head's other layers): ood_factor is another number, or a new head's
            self.ood_threshold = None
            if getattr(self, 'readout', None) == 'factor':
                self.readout = None
        if self.ood_head is not head:  # rebuilt for another width: never trained
            self.ood_head_trained = False
        labels = (getattr(self, 'pretrained_cfg', None) or {}).get('label_names')
        if labels is not None and len(labels) != num_classes:  # names of classes the new classifier has not got
            for attr in ('pretrained_cfg', 'default_cfg'):
                cfg = getattr(self, attr, None)
                if isinstance(cfg, dict):
                    setattr(self, attr, {k: v for k, v in cfg.items() if k != 'label_names'})

    def _forget_spatial_calibration(self) -> None:
        """Drop what was calibrated on the classifier's logits: the spatial threshold, and the spatial readout."""
        self.spatial_threshold = None
        if getattr(self, 'readout', None) == 'spatial':
            self.readout = None

    def _fit_ood_head(self) -> None:
        """(Re)build the OOD head when the pre-logits width changed, keeping device, dtype and requires_grad."""
        old = getattr(self, 'ood_head', None)
        if old is not None and old.in_features == self.head_hidden_size:
            return
        ref = old.weight if old is not None else next(self.parameters())
        self.ood_head = nn.Linear(self.head_hidden_size, 2, device=ref.device, dtype=ref.dtype)
        self.ood_head.requires_grad_(ref.requires_grad)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A plain timm checkpoint has every key but the OOD head's: load it, keep the fresh head, and say so. The
        # model is then a cross-entropy classifier with an untrained OOD head, and says that too
        head_keys = [f'{prefix}ood_head.{k}' for k in ('weight', 'bias')]
        if not any(k in state_dict for k in head_keys) and any(k.startswith(prefix) for k in state_dict):
            self.ood_head_trained = False
            direct = hasattr(self, '_strict_load')  # model.load_state_dict, which warns at its caller's line
            if direct:
                self._head_missing = True
            else:  # a module that holds this model loads it
                _warn_no_head(stacklevel=3)
            # strict loading lets it through all the same; non-strict, the keys are reported missing (torch passes
            # strict=True here whatever the caller asked, so load_state_dict below records what was)
            if not direct or self._strict_load:
                state_dict.update({k: v for k, v in zip(head_keys, (self.ood_head.weight, self.ood_head.bias))})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; a checkpoint without the OOD head's keys (a plain timm classifier's) loads
        with a warning under ``strict``, and reports them in ``missing_keys`` otherwise; the model's
        ``ood_head_trained`` is then False."""
        self._strict_load, self._head_missing = strict, False
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            missing = self._head_missing
            del self._strict_load, self._head_missing
        if missing:
            _warn_no_head(stacklevel=3)
        return result

    @torch.jit.unused
    def _require_classifier(self, what: str) -> None:
        if self.num_classes == 0:
            raise RuntimeError(f'{what} needs the classification head, but this model has none (num_classes=0); '
                               'create it with num_classes > 0')

    @torch.jit.unused
    def _warn_if_training(self, what: str) -> None:
        """Scores for a decision taken in train mode without a gradient: almost always a missing ``model.eval()``
        (timm.create_model returns a model in train mode). BatchNorm would normalise with the batch's statistics and
        update its running ones, so the scores are not those the thresholds were calibrated on."""
        if self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            warnings.warn(f'{what}: the model is in training mode, so BatchNorm normalises with this batch\'s '
                          'statistics (and updates its running ones) and dropout is on: the scores are not the ones '
                          'its thresholds were calibrated on in eval mode, and the model changes as it scores; call '
                          'model.eval() first', stacklevel=3)

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor, positions: bool = True) -> None:
        """Fail with a message that says what was expected, rather than deep inside the network. ``positions``:
        also refuse an input smaller than the total stride, which leaves the feature map no position of its own."""
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing (torchvision feature extraction): no values to check
            return
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'{name} expects a torch.Tensor image batch, got {type(x).__name__}')
        if x.ndim != 4:
            hint = '; add the batch dimension with x.unsqueeze(0)' if x.ndim == 3 else ''
            raise ValueError(f'{name} expects a (B, C, H, W) image batch, got a {x.ndim}-D tensor '
                             f'of shape {tuple(x.shape)}{hint}')
        if not x.is_floating_point():
            raise TypeError(
                f'{name} expects a floating-point image batch normalised with the model\'s mean/std, got {x.dtype}; '
                'use timm.data.create_transform(**timm.data.resolve_data_config(model=model)) or '
                'x.float().div(255) followed by normalisation')
        weight_dtype = self.ood_head.weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f'{name} holds {weight_dtype} weights but got a {x.dtype} input; convert one to the other '
                            f'(x.to({weight_dtype}) or model.to({x.dtype})), or run under torch.autocast')
        in_chans = getattr(self, 'in_chans', None)
        if in_chans is not None and x.shape[1] != in_chans:
            if x.shape[-1] == in_chans:  # (B, H, W, C): an image array's layout, not a tensor's
                raise ValueError(f'{name} expects (B, C, H, W) images, got shape {tuple(x.shape)}, which looks like '
                                 f'(B, H, W, C) with {in_chans} channels last: pass x.permute(0, 3, 1, 2), or '
                                 'build the input with the model\'s timm transform')
            convert = (" (PIL: image.convert('RGB') before the model's timm transform)" if in_chans == 3 else '')
            raise ValueError(f'{name} expects {in_chans}-channel images, got {x.shape[1]} channels '
                             f'(input shape {tuple(x.shape)}): convert the images to {in_chans} channels{convert}; '
                             f'to train a model on {x.shape[1]}-channel images instead, create it with '
                             f'in_chans={x.shape[1]} (pretrained weights then lose their calibrated thresholds)')
        stride = _total_stride(self)
        if positions and stride and (x.shape[2] < stride or x.shape[3] < stride):
            size = self.pretrained_cfg.get('input_size', (None, '?', '?'))
            raise ValueError(f'{name} has a total stride of {stride}, so a {x.shape[2]}x{x.shape[3]} input leaves '
                             f'no feature-map position of its own; use at least {stride}x{stride} '
                             f'(the model is configured for {size[1]}x{size[2]})')
        # a full pass over the input (and a device sync): skipped inside torch.compile/export, where a data-dependent
        # branch would break the graph, and when the user opts out for throughput (model.check_finite = False)
        if getattr(self, 'check_finite', True) and x.device.type != 'meta' and not torch.compiler.is_compiling():
            peak = float(x.detach().abs().amax()) if x.numel() else 0.0  # NaN and Inf propagate: one reduction for both
            if not math.isfinite(peak):
                raise ValueError(f'{name} got an input with NaN or Inf values; the outputs would be NaN. Check the '
                                 'image loading and normalisation (set model.check_finite = False to skip this check)')
            if peak > _MAX_NORMALISED and not getattr(self, '_range_warned', False):
                self._range_warned = True  # once per model: a pipeline feeding raw pixels would warn every batch
                warnings.warn(f'{name} got input values up to {peak:.0f}, but normalised images lie within about '
                              '+-3: are these 0-255 pixels? Divide by 255 and normalise with the model\'s mean/std '
                              '(timm.data.create_transform(**timm.data.resolve_data_config(model=model))); '
                              'otherwise ood_factor and spatial_score are meaningless', stacklevel=3)


def _require_spatial(model: nn.Module) -> None:
    """Reject models whose ``forward_features`` is no (B, num_features, H, W) map (ViT tokens, Swin's channels-last
    maps): SSOD applies its heads at every position of that map. The probe runs on meta tensors (shapes only, no
    arithmetic, the model's own tensors untouched), once per model class."""
    cls = type(model)
    if cls in _SPATIAL_OK:
        return
    size = tuple((getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3, 224, 224))
    state = {f'm.{k}': v.to('meta') for k, v in [*model.named_parameters(), *model.named_buffers()]}
    ref = next(iter(state.values()), None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = torch.func.functional_call(_Features(model), state, (torch.zeros(
                1, *size, device='meta', dtype=ref.dtype if ref is not None else torch.float32),))
        shape = tuple(out.shape)
    except Exception:  # the probe itself failed (lazy modules, an unusual input size): do not guess
        return
    finally:
        model.train(was_training)
    if len(shape) == 4 and shape[1] == model.num_features:
        _SPATIAL_OK[cls] = True
        return
    layout = ('tokens (B, N, C), as a vision transformer gives' if len(shape) == 3 else
              'a channels-last (B, H, W, C) map' if len(shape) == 4 and shape[-1] == model.num_features else
              f'a {len(shape)}-D tensor')
    raise TypeError(f'{cls.__name__} is not a CNN SSOD can use: its forward_features gives {layout}, shape {shape} '
                    f'for a {size} input, but SSOD applies its heads at every position of a (B, C, H, W) feature map. '
                    'Use a CNN (resnet50, efficientnet_b0, convnext_tiny, ...)')


class _Features(nn.Module):
    """``forward_features`` as ``forward``, for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.forward_features(x)


def _head_is_per_position(model: nn.Module) -> bool:
    """Whether ``forward_head`` is timm's MobileNetV3 head: global pooling, then only per-position layers
    (``conv_head``, ``norm_head``, ``act2``), flatten and dropout (timm's tests call these EARLY_POOL_MODELS)."""
    conv = getattr(model, 'conv_head', None)
    return (isinstance(model, MobileNetV3) and type(model).forward_head is MobileNetV3.forward_head
            and isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1)


def _total_stride(model: nn.Module) -> int:
    feature_info = getattr(model, 'feature_info', None)
    try:
        return int(feature_info[-1]['reduction'])
    except (TypeError, KeyError, IndexError):
        return 0


def _ssod_class(base: type) -> type:
    """``SSOD<Base>``: the timm class with :class:`SSODModel` mixed in, made once per class."""
    if issubclass(base, SSODModel):
        return base
    cls = _SSOD_CLASSES.get(base)
    if cls is None:
        name = f'SSOD{base.__name__}'
        # TorchScript reads annotations from the instance's own class, so carry the base's and ours
        annotations = {**getattr(base, '__annotations__', {}), **SSODModel.__annotations__}
        unused = [*getattr(base, '__jit_unused_properties__', []), *SSODModel.__jit_unused_properties__]
        cls = type(name, (SSODModel, base), {'__module__': __name__, '__qualname__': name,
                                             '__annotations__': annotations, '__doc__': SSODModel.__doc__,
                                             '__jit_unused_properties__': unused})
        _SSOD_CLASSES[base] = cls
        globals().setdefault(name, cls)  # importable by name (see __getattr__ for classes not made yet)
    return cls


def _new_ssod_instance(base: type) -> SSODModel:
    """Unpickling: an empty ``SSOD<Base>`` whose state pickle then restores."""
    cls = _ssod_class(base)
    return cls.__new__(cls)


def __getattr__(name: str) -> type:
    """``ssod_zoo.adapter.SSOD<Base>`` for any timm model class ``<Base>``, made on demand, so the generated classes
    are importable by name in any interpreter (and pickles that name them load)."""
    if name.startswith('SSOD') and len(name) > 4:
        base_name = name[4:]
        candidates = [getattr(timm.models, base_name, None)] + [
            getattr(m, base_name, None) for k, m in list(sys.modules.items()) if k.startswith('timm.models.')]
        for base in candidates:
            if isinstance(base, type) and issubclass(base, nn.Module) and base.__name__ == base_name:
                return _ssod_class(base)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def wrap(
        model: Union[nn.Module, str],
        *,
        return_ood: bool = True,
        ood_threshold: Optional[float] = None,
        spatial_threshold: Optional[float] = None,
        readout: Optional[str] = None,
        ood_head_trained: Optional[bool] = None,
        **kwargs,
) -> SSODModel:
    """Turn a timm CNN classifier into an SSOD model.

    Args:
        model: a timm model instance (its weights are shared, not copied; the instance passed in is left as it
            was) or a model name for ``timm.create_model``, e.g. ``'efficientnet_b0'`` or ``'resnet50.tv_in1k'``.
        return_ood: ``forward`` returns ``SSODOutput(logits, ood_factor)`` if True, else the plain logits tensor.
        ood_threshold: calibrated rejection threshold on ``ood_factor``, kept as ``model.ood_threshold``.
        spatial_threshold: calibrated rejection threshold on :meth:`SSODModel.spatial_score`, kept as
            ``model.spatial_threshold``.
        readout: the readout chosen for the weights on OOD validation images, ``'spatial'`` or ``'factor'``, kept
            as ``model.readout``.
        ood_head_trained: False for weights whose OOD head was never trained (a cross-entropy model), kept as
            ``model.ood_head_trained``. Default: an SSOD model's own; False for a plain timm name with
            ``pretrained=True`` (a trained classifier and a new OOD head); else True. For a plain instance with
            trained weights, pass False until the OOD head is trained (``ssod train`` sets it).
        **kwargs: passed to ``timm.create_model`` when ``model`` is a name (``pretrained``, ``num_classes``, ...).

    Returns:
        The SSOD model: an instance of the model's own class with :class:`SSODModel` mixed in and a fresh
        2-way ``ood_head`` on the pre-logits features.

    Example:
        >>> m = wrap('resnet18', num_classes=10)
        >>> logits, p_id = m(torch.randn(2, 3, 64, 64))
    """
    pretrained_name = isinstance(model, str) and bool(kwargs.get('pretrained'))
    if isinstance(model, str):
        model = timm.create_model(model, **kwargs)
    elif kwargs:
        raise TypeError(f'wrap() got model arguments {sorted(kwargs)} with a model instance; '
                        'they apply only when the model is given by name')
    if not isinstance(model, nn.Module):
        raise TypeError(f'wrap() expects a timm model or model name, got {type(model).__name__}')
    missing = [m for m in ('forward_features', 'forward_head', 'get_classifier', 'reset_classifier')
               if not callable(getattr(model, m, None))]
    if missing or not hasattr(model, 'head_hidden_size'):
        raise TypeError(f'{type(model).__name__} is not a timm classifier with the forward_features/forward_head '
                        f'contract (missing: {", ".join(missing) or "head_hidden_size"}); wrap() needs one')
    _require_spatial(model)

    cls = _ssod_class(type(model))
    ssod = cls.__new__(cls)
    # shallow copy: same parameters and submodules, but own containers, so adding ood_head leaves `model` as it was
    ssod.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in model.__dict__.items()
                          if k != '_model_args'})
    if '_model_args' in model.__dict__:  # timm's record of the trunk's arguments, behind the property
        ssod._model_args = model.__dict__['_model_args']
    ssod.return_ood = return_ood
    ssod.ood_threshold = ood_threshold if ood_threshold is None else check_threshold(ood_threshold)
    ssod.spatial_threshold = spatial_threshold if spatial_threshold is None else check_spatial_threshold(
        spatial_threshold)
    ssod.readout = readout if readout is None else check_readout(readout)
    if ood_head_trained is None:  # an SSOD model's own say; a plain classifier's timm weights have no OOD head
        ood_head_trained = getattr(model, 'ood_head_trained', True) if isinstance(model, SSODModel) else \
            not pretrained_name
    ssod.ood_head_trained = bool(ood_head_trained)
    ssod._fit_ood_head()
    return ssod
