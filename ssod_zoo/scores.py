"""Post-hoc OOD scores: the baselines SSOD is compared against, on the same backbone.

Every score is **higher = more in-distribution** (the convention of :mod:`ssod_zoo.metrics`), one value per image.
Scores that need nothing but the model's outputs are pure functions (:func:`msp`, :func:`max_logit`,
:func:`energy`, :func:`odin`); those that are fitted on in-distribution training features are small classes
with ``fit(...)`` returning ``self`` and ``__call__(...)`` returning scores (:class:`ReAct`, :class:`KNN`,
:class:`Mahalanobis`, :class:`ViM`).

Devices and dtypes: every score is computed on the input's device, in float32, or float64 when the input is
float64 (half-precision inputs are upcast: logsumexp and distances overflow or lose too much in 16 bits).
Fitted statistics are computed in float64 and kept on the device ``fit`` saw; ``__call__`` moves what it needs
to the input's device. The classes work in chunks of ``chunk_size`` rows, so memory stays bounded for banks of
100k+ features: no (N_query, N_bank) matrix is ever built.

Features are the pooled pre-logits features, ``model.forward_head(model.forward_features(x), pre_logits=True)``,
and ``weight``/``bias`` the classifier's, ``model.get_classifier()``.
"""
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['KNN', 'Mahalanobis', 'ReAct', 'ViM', 'energy', 'max_logit', 'msp', 'odin']


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability: max_i softmax(z)_i.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
    Networks", ICLR 2017.

    Args:
        logits: (B, M) class logits z.

    Returns:
        (B,) scores in (0, 1].
    """
    _check_logits(logits)
    return _compute(logits).softmax(dim=1).amax(dim=1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit: max_i z_i.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.

    Args:
        logits: (B, M) class logits z.

    Returns:
        (B,) scores.
    """
    _check_logits(logits)
    return _compute(logits).amax(dim=1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy: T * logsumexp(z / T).

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.

    Args:
        logits: (B, M) class logits z.
        temperature: T > 0; the paper uses T = 1.

    Returns:
        (B,) scores.
    """
    _check_logits(logits)
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    return temperature * torch.logsumexp(_compute(logits) / temperature, dim=1)


def odin(
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        std: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """ODIN: max_i softmax(f(x~) / T)_i, with x~ = x - epsilon * sign(-grad_x log max_i softmax(f(x) / T)_i) / std.

    Liang et al., "Enhancing The Reliability of Out-of-distribution Image Detection in Neural Networks", ICLR 2018.

    With ``std``, the per-channel std the images were normalised with (``model.pretrained_cfg['std']``), the step
    on the normalised ``x`` is ``epsilon / std``: ``epsilon`` is in units of pixel values in [0, 1], as in the
    paper's code (which divides by the std of its normalisation) and OpenOOD's. Without it (None), ``epsilon`` is in
    the units of ``x`` itself, a step about 4.4 times smaller at ImageNet's std.
    Gradients are taken with respect to the input only: the model's parameters get no ``.grad``. Works when the
    caller is under ``torch.no_grad()`` or ``torch.inference_mode()``. Put the model in ``eval()`` first, or
    BatchNorm couples the images of the batch.

    Args:
        logits_fn: a callable images -> (B, M) logits, e.g. the model in eval mode; it must not disable grad.
        x: (B, C, H, W) input batch (any shape ``logits_fn`` accepts, batch first).
        temperature: T > 0; the paper uses T = 1000.
        epsilon: the size of the input step; 0 gives temperature scaling alone.
        std: (C,) the normalisation std of ``x``'s channels, or None (see above).

    Returns:
        (B,) scores in (0, 1], detached.
    """
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    if not math.isfinite(epsilon):
        raise ValueError(f'epsilon must be finite, got {epsilon}')
    if not callable(logits_fn):
        raise TypeError(f'logits_fn must be a callable images -> logits (the model); got {type(logits_fn).__name__}')
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError('odin() needs a floating-point input tensor x to differentiate with respect to')
    with torch.inference_mode(False), torch.enable_grad():
        # clone outside inference mode so that an inference-mode tensor becomes one autograd can use
        x_in = x.detach().clone().requires_grad_(True)
        logits = logits_fn(x_in)
        _check_logits(logits, batch=x.shape[0])
        if not logits.requires_grad:
            raise RuntimeError('odin() needs the gradient of the logits with respect to the input, but logits_fn(x) '
                               'returned a tensor that does not require grad; do not wrap the model call inside '
                               'logits_fn in torch.no_grad() or torch.inference_mode()')
        # cross-entropy against the predicted class is -log max softmax: stepping against its gradient raises it
        logits = _compute(logits) / temperature
        loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction='sum')
        (grad,) = torch.autograd.grad(loss, x_in)
    step = grad.sign()
    if std is not None:
        step = step / _channel_std(std, x)
    with torch.no_grad():
        x_tilde = x_in.detach() - epsilon * step
        return msp(logits_fn(x_tilde) / temperature).detach()


def _channel_std(std: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """``std`` as a (1, C, 1, 1) tensor on ``x``'s device and dtype, checked against ``x``'s C channels."""
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).flatten()
    if x.ndim < 2 or std_t.numel() != x.shape[1] or not bool((std_t > 0).all()):
        raise ValueError(f'std must hold one positive value per channel of x ({x.shape[1] if x.ndim > 1 else "?"}), '
                         f'got {list(std) if isinstance(std, (list, tuple)) else std}')
    return std_t.view(1, -1, *([1] * (x.ndim - 2)))


class ReAct:
    """ReAct: energy of the classifier on clipped features, T = 1.

    score = logsumexp(W min(h, c) + b), with c the ``percentile``-th percentile of ID training activations.

    Sun et al., "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.

    Args:
        percentile: which percentile of the ID activations becomes the clip threshold c; the paper uses 90.

    Attributes:
        c: the clip threshold (float), set by :meth:`fit`.
    """

    def __init__(self, percentile: float = 90.0) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f'percentile must be in [0, 100], got {percentile}')
        self.percentile = float(percentile)
        self.c: Optional[float] = None
        self.num_features: Optional[int] = None

    def fit(self, id_features: torch.Tensor) -> 'ReAct':
        """Set c to the percentile of all ID activations (every element of every feature vector).

        Args:
            id_features: (N, D) pooled features of ID training (or validation) images.

        Returns:
            self.
        """
        _check_features(id_features, 'id_features')
        _check_finite(id_features, 'id_features', chunk_size=4096)
        flat = id_features.reshape(-1)
        self.c = _percentile(flat if flat.is_floating_point() else flat.float(), self.percentile)
        self.num_features = id_features.shape[1]
        return self

    def __call__(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """Score a batch.

        Args:
            features: (B, D) pooled features.
            weight: (M, D) classifier weight W.
            bias: (M,) classifier bias b, or None.

        Returns:
            (B,) scores.
        """
        if self.c is None:
            raise _not_fitted(self)
        _check_features(features, 'features', self.num_features)
        weight, bias = _check_classifier(weight, bias, self.num_features)
        x = _compute(features)
        logits = F.linear(x.clamp(max=self.c), weight.to(x), None if bias is None else bias.to(x))
        return torch.logsumexp(logits, dim=1)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(percentile={self.percentile}, c={self.c})'


class KNN:
    """Deep nearest neighbours: minus the distance to the k-th nearest ID training feature, on the unit sphere.

    score = -|| z - z_(k) ||_2, with z = h / ||h||_2 and z_(k) the k-th nearest normalised training feature.

    Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.

    The bank keeps the dtype of the features given to :meth:`fit` (pass float16 features to halve its memory) and
    the device; scoring walks the bank and the queries in ``chunk_size`` blocks and keeps a running top-k per query,
    so it needs O(chunk_size^2 + N_query * k) memory beyond the bank.

    Args:
        k: which neighbour; the paper uses 50 on CIFAR-10 and 1000 on ImageNet (with the full training set).
        chunk_size: rows of the bank and of the queries compared at once.

    Attributes:
        bank: (N, D) the L2-normalised training features, set by :meth:`fit`.
    """

    def __init__(self, k: int = 50, chunk_size: int = 4096) -> None:
        if k < 1:
            raise ValueError(f'k must be >= 1, got {k}')
        self.k = int(k)
        self.chunk_size = _check_chunk_size(chunk_size)
        self.bank: Optional[torch.Tensor] = None

    def fit(self, features: torch.Tensor) -> 'KNN':
        """Store the normalised training features as the bank.

        Args:
            features: (N, D) pooled features of the ID training images, N >= k.

        Returns:
            self.
        """
        _check_features(features, 'features')
        if features.shape[0] < self.k:
            raise ValueError(f'KNN(k={self.k}) needs at least k training features, got {features.shape[0]}; '
                             'fit on more images or lower k')
        _check_finite(features, 'features', self.chunk_size)
        dtype = features.dtype if features.is_floating_point() else torch.float32
        bank = torch.empty(features.shape, dtype=dtype, device=features.device)
        for i in range(0, features.shape[0], self.chunk_size):
            bank[i:i + self.chunk_size] = F.normalize(_compute(features[i:i + self.chunk_size]), dim=1)
        self.bank = bank
        return self

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Score a batch.

        Args:
            features: (B, D) pooled features.

        Returns:
            (B,) scores in [-2, 0].
        """
        if self.bank is None:
            raise _not_fitted(self)
        _check_features(features, 'features', self.bank.shape[1])
        queries = F.normalize(_compute(features), dim=1)
        cs = self.chunk_size
        q_chunks = queries.split(cs)
        # running top-k cosine similarities per query chunk; the bank is the outer loop so each bank chunk
        # crosses devices once
        best = [q.new_empty(q.shape[0], 0) for q in q_chunks]
        for b0 in range(0, self.bank.shape[0], cs):
            bank = self.bank[b0:b0 + cs].to(device=queries.device, dtype=queries.dtype)
            for i, q in enumerate(q_chunks):
                merged = torch.cat([best[i], q @ bank.T], dim=1)
                best[i] = merged.topk(min(self.k, merged.shape[1]), dim=1, sorted=False).values
        if not best:
            return queries.new_empty(0)
        kth_similarity = torch.cat([b.amin(dim=1) for b in best])
        # ||a - b||^2 = 2 - 2 a.b for unit vectors
        return -(2 - 2 * kth_similarity).clamp(min=0).sqrt()

    def __repr__(self) -> str:
        bank = 'unfitted' if self.bank is None else f'bank={tuple(self.bank.shape)}'
        return f'{type(self).__name__}(k={self.k}, {bank})'


class Mahalanobis:
    """Mahalanobis distance to the closest class mean, with one covariance shared by all classes.

    score = -min_c (h - mu_c)^T Sigma^+ (h - mu_c), with mu_c the class means and Sigma the shared covariance of
    the ID training features; the squared distance, as in the paper's confidence score M(x). No input
    preprocessing and no feature ensemble (the paper's full method adds both).

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
    NeurIPS 2018.

    Sigma^+ is the pseudo-inverse (eigenvalues below ``D * eps * max eigenvalue`` dropped, as ``pinvh`` does), so
    fewer images than feature dimensions or dead ReLU units are fine.

    Args:
        chunk_size: rows processed at once in ``fit`` and ``__call__``.

    Attributes:
        classes: (C,) the class labels seen by :meth:`fit`; a class with no training image has no mean.
    """

    def __init__(self, chunk_size: int = 4096) -> None:
        self.chunk_size = _check_chunk_size(chunk_size)
        self.classes: Optional[torch.Tensor] = None
        self._stats: Optional[Dict[str, torch.Tensor]] = None
        self._cache: Dict[Tuple[torch.device, torch.dtype], Dict[str, torch.Tensor]] = {}

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> 'Mahalanobis':
        """Fit the class means and the shared covariance.

        Args:
            features: (N, D) pooled features of the ID training images.
            labels: (N,) their integer class labels.

        Returns:
            self.
        """
        _check_features(features, 'features')
        if not isinstance(labels, torch.Tensor) or labels.shape != features.shape[:1]:
            raise ValueError(f'labels must be a (N,) tensor matching features (N, D) = {tuple(features.shape)}, '
                             f'got {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)}')
        if labels.is_floating_point() or labels.dtype == torch.bool or (labels < 0).any():
            raise ValueError(f'labels must be non-negative integer class indices, got {labels.dtype}')
        _check_finite(features, 'features', self.chunk_size)
        n, d = features.shape
        device, cs = features.device, self.chunk_size
        labels = labels.to(device=device, dtype=torch.long)
        num_classes = int(labels.max()) + 1
        sums = torch.zeros(num_classes, d, dtype=torch.float64, device=device)
        for i in range(0, n, cs):
            sums.index_add_(0, labels[i:i + cs], features[i:i + cs].double())
        counts = torch.bincount(labels, minlength=num_classes)
        means = sums / counts.clamp(min=1).unsqueeze(1).double()
        cov = torch.zeros(d, d, dtype=torch.float64, device=device)
        for i in range(0, n, cs):  # second pass, centred per class: no sum-of-squares cancellation
            centred = features[i:i + cs].double() - means[labels[i:i + cs]]
            cov.addmm_(centred.T, centred)
        cov /= n
        present = counts > 0
        self.classes = torch.nonzero(present).squeeze(1)
        means = means[present]
        whiten = _whitening(cov)  # (D, r): (h - mu)^T Sigma^+ (h - mu) = ||(h - mu) whiten||^2
        # centre on the grand mean first so the expanded squared distance in __call__ cancels less
        center = sums.sum(0) / n
        means_w = (means - center) @ whiten
        self._stats = {'center': center, 'whiten': whiten, 'means_w': means_w,
                       'means_w_sq': means_w.square().sum(1)}
        self._cache = {}
        return self

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Score a batch.

        Args:
            features: (B, D) pooled features.

        Returns:
            (B,) scores <= 0 (up to rounding).
        """
        if self._stats is None:
            raise _not_fitted(self)
        _check_features(features, 'features', self._stats['center'].shape[0])
        s = _stats_on(self._stats, self._cache, features)
        out = []
        for x in _compute(features).split(self.chunk_size):
            z = (x - s['center']) @ s['whiten']
            dist = z.square().sum(1, keepdim=True) - 2 * z @ s['means_w'].T + s['means_w_sq']
            out.append(-dist.amin(dim=1).clamp(min=0))
        return torch.cat(out) if out else _compute(features).new_empty(0)

    def __repr__(self) -> str:
        fitted = 'unfitted' if self.classes is None else f'classes={self.classes.numel()}'
        return f'{type(self).__name__}({fitted})'


class NoResidualError(ValueError):
    """:meth:`ViM.fit`: the ID features lie in the principal subspace (``spanned``, the dimensions they span about
    ViM's origin, is at most its dim), so no residual is left to score with."""

    def __init__(self, message: str, spanned: int) -> None:
        super().__init__(message)
        self.spanned = spanned


class ViM:
    """Virtual-logit matching: energy minus the scaled norm of the feature's residual off the principal subspace.

    score = logsumexp(z) - alpha * ||(h - u)^{P-perp}||, with u = -W^+ b, P the top-``dim`` principal subspace of
    the ID training features centred on u, and alpha = mean_i max_j z_ij / mean_i ||(h_i - u)^{P-perp}|| on the fit
    set (the paper's virtual logit).

    Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.

    Args:
        dim: dimension of the principal subspace; None picks the paper's rule: 1000 if D >= 2048, 512 if
            D >= 768, else D // 2.
        chunk_size: rows processed at once in ``fit`` and ``__call__``.

    Attributes:
        u: (D,) the origin -W^+ b.
        principal_dim: the dimension of P actually used.
        alpha: the virtual-logit scale (float).
    """

    def __init__(self, dim: Optional[int] = None, chunk_size: int = 4096) -> None:
        if dim is not None and dim < 1:
            raise ValueError(f'dim must be >= 1 or None, got {dim}')
        self.dim = dim
        self.chunk_size = _check_chunk_size(chunk_size)
        self.u: Optional[torch.Tensor] = None
        self.principal_dim: Optional[int] = None
        self.alpha: Optional[float] = None
        self._num_classes: Optional[int] = None
        self._stats: Optional[Dict[str, torch.Tensor]] = None
        self._cache: Dict[Tuple[torch.device, torch.dtype], Dict[str, torch.Tensor]] = {}

    def fit(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> 'ViM':
        """Fit the origin, the principal subspace and alpha.

        Args:
            features: (N, D) pooled features of the ID training images.
            weight: (M, D) classifier weight W.
            bias: (M,) classifier bias b, or None (then u = 0).

        Returns:
            self.
        """
        _check_features(features, 'features')
        n, d = features.shape
        weight, bias = _check_classifier(weight, bias, d)
        dim = _vim_dim(d) if self.dim is None else self.dim
        if not 0 < dim < d:
            raise ValueError(f'ViM needs 0 < dim < D to leave a residual, got dim={dim} for D={d}; '
                             'pass a smaller dim or dim=None for the paper\'s rule')
        _check_finite(features, 'features', self.chunk_size)
        device, cs = features.device, self.chunk_size
        w = weight.to(device=device, dtype=torch.float64)
        b = torch.zeros(w.shape[0], dtype=torch.float64, device=device) if bias is None else bias.to(w)
        u = -torch.linalg.pinv(w) @ b
        cov = torch.zeros(d, d, dtype=torch.float64, device=device)
        for i in range(0, n, cs):
            centred = features[i:i + cs].double() - u
            cov.addmm_(centred.T, centred)
        eigvals, eigvecs = torch.linalg.eigh(cov / n)
        residual_basis = eigvecs[:, eigvals.argsort(descending=True)[dim:]]  # (D, D - dim)
        max_logit_sum = vnorm_sum = norm_sum = 0.0
        for i in range(0, n, cs):
            x = features[i:i + cs].double()
            max_logit_sum += float(F.linear(x, w, b).amax(dim=1).sum())
            vnorm_sum += float(((x - u) @ residual_basis).norm(dim=1).sum())
            norm_sum += float((x - u).norm(dim=1).sum())
        if vnorm_sum <= 1e-10 * norm_sum:
            spanned = int((eigvals > eigvals.max() * d * torch.finfo(torch.float64).eps).sum())
            raise NoResidualError(f'the ID features have no component outside the principal subspace (they span '
                                  f'{spanned} dimensions about u, dim is {dim}), so the virtual logit is always 0 and '
                                  'alpha is undefined; ' + (f'use a smaller dim (below {spanned})' if spanned > 1
                                                            else 'fit on more, varied images'), spanned)
        self.u = u
        self.principal_dim = dim
        self.alpha = max_logit_sum / vnorm_sum
        self._stats = {'u': u, 'residual_basis': residual_basis}
        self._cache = {}
        self._num_classes = w.shape[0]
        return self

    def __call__(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Score a batch.

        Args:
            features: (B, D) pooled features.
            logits: (B, M) the classifier's logits for the same images.

        Returns:
            (B,) scores.
        """
        if self._stats is None:
            raise _not_fitted(self)
        _check_features(features, 'features', self.u.shape[0])
        _check_logits(logits, batch=features.shape[0])
        if logits.shape[1] != self._num_classes:
            raise ValueError(f'ViM was fitted with a {self._num_classes}-class classifier, got logits with '
                             f'{logits.shape[1]} classes')
        s = _stats_on(self._stats, self._cache, features)
        out = []
        for x in _compute(features).split(self.chunk_size):
            out.append(((x - s['u']) @ s['residual_basis']).norm(dim=1))
        vnorm = torch.cat(out) if out else _compute(features).new_empty(0)
        return torch.logsumexp(_compute(logits).to(vnorm), dim=1) - self.alpha * vnorm

    def __repr__(self) -> str:
        fitted = 'unfitted' if self.alpha is None else f'principal_dim={self.principal_dim}, alpha={self.alpha:.4g}'
        return f'{type(self).__name__}(dim={self.dim}, {fitted})'


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype scores are computed in: float64 stays, everything else becomes float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_logits(logits: torch.Tensor, batch: Optional[int] = None) -> None:
    if not isinstance(logits, torch.Tensor):
        hint = '; take its .logits (an SSOD model returns (logits, ood_factor))' if hasattr(logits, 'logits') else ''
        raise TypeError(f'expected a (B, M) logits tensor, got {type(logits).__name__}{hint}')
    if logits.ndim != 2 or (batch is not None and logits.shape[0] != batch):
        want = '(B, M)' if batch is None else f'({batch}, M)'
        raise ValueError(f'expected logits of shape {want}, got {tuple(logits.shape)}')


def _check_features(features: torch.Tensor, name: str, dim: Optional[int] = None) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f'{name} must be a (N, D) tensor, got {type(features).__name__}')
    if features.ndim != 2:
        hint = ('; pool them first: model.forward_head(model.forward_features(x), pre_logits=True)'
                if features.ndim == 4 else '')
        raise ValueError(f'{name} must be (N, D) pooled features, got shape {tuple(features.shape)}{hint}')
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f'{name} have {features.shape[1]} dimensions but the detector was fitted on {dim}; '
                         'use features from the same layer of the same model')
    if features.shape[0] == 0 and dim is None:
        raise ValueError(f'{name} is empty; fit on at least one image')


def _check_classifier(weight: torch.Tensor, bias: Optional[torch.Tensor], dim: Optional[int]
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or (dim is not None and weight.shape[1] != dim):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f'weight must be the classifier weight (M, {dim if dim is not None else "D"}), got {shape}; '
                         'pass model.get_classifier().weight')
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f'bias must be ({weight.shape[0]},) to match weight {tuple(weight.shape)}, got {shape}')
    return weight.detach(), None if bias is None else bias.detach()


def _check_finite(features: torch.Tensor, name: str, chunk_size: int) -> None:
    for i in range(0, features.shape[0], chunk_size):
        bad = ~torch.isfinite(features[i:i + chunk_size]).all(dim=1)
        if bad.any():
            raise ValueError(f'{name} contain NaN/Inf (first in row {i + int(bad.nonzero()[0])}); fitting on them '
                             'would poison every score. Extract features in float32 and drop the broken images')


def _check_chunk_size(chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    return int(chunk_size)


def _not_fitted(detector: object) -> RuntimeError:
    name = type(detector).__name__
    return RuntimeError(f'{name} is not fitted yet: call {name}(...).fit(...) on in-distribution training '
                        'features before scoring')


def _stats_on(stats: Dict[str, torch.Tensor], cache: Dict, like: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The fitted statistics on ``like``'s device and compute dtype, converted once per (device, dtype)."""
    key = (like.device, torch.float64 if like.dtype == torch.float64 else torch.float32)
    if key not in cache:
        cache[key] = {k: v.to(device=key[0], dtype=key[1]) for k, v in stats.items()}
    return cache[key]


def _percentile(x: torch.Tensor, q: float, chunk_size: int = 1 << 22) -> float:
    """numpy.percentile(x, q) (linear interpolation) of a 1-D tensor, in O(chunk_size) extra memory.

    torch.quantile stops at 2^24 elements and kthvalue copies the input with int64 indices (3x its size), too
    much for 100k x 2048 activations.
    """
    pos = q / 100.0 * (x.numel() - 1)
    rank = math.floor(pos)
    v_lo, v_hi = _order_statistics(x, rank + 1, chunk_size)
    return v_lo + (pos - rank) * (v_hi - v_lo) if pos > rank else v_lo


def _order_statistics(x: torch.Tensor, k: int, chunk_size: int, num_buckets: int = 1024) -> Tuple[float, float]:
    """The k-th and (k+1)-th smallest elements of a 1-D tensor (1-based; both the k-th when k = N).

    Selection without sorting or copying: keep a value range [lo, hi] that holds the k-th element and the count of
    elements below it; each pass over the chunks splits the range into equal-width buckets and keeps the span of
    the bucket that holds rank k, until the range is one value or its elements fit in one chunk.
    """
    chunks = x.split(chunk_size)
    lo = min(float(c.min()) for c in chunks)
    hi = max(float(c.max()) for c in chunks)
    below, n_in = 0, x.numel()  # elements < lo, elements in [lo, hi]
    while lo < hi and n_in > chunk_size:
        scale = num_buckets / (hi - lo)
        if not 0 < scale < math.inf:
            # a range too narrow (or wide) for float64 buckets: peel off the lowest value instead
            n_lo = sum(int((c == lo).sum()) for c in chunks)
            if k - below <= n_lo:
                hi, n_in = lo, n_lo
                break
            below, n_in = below + n_lo, n_in - n_lo
            lo = min(float(c.masked_fill((c <= lo) | (c > hi), math.inf).min()) for c in chunks)
            continue
        counts = torch.zeros(num_buckets + 1, dtype=torch.long, device=x.device)
        mins = torch.full((num_buckets + 1,), math.inf, dtype=torch.float64, device=x.device)
        maxs = torch.full((num_buckets + 1,), -math.inf, dtype=torch.float64, device=x.device)
        for c in chunks:
            c = c.double()
            # floor((c - lo) * scale) is monotone in c, so each bucket is an interval of values
            idx = ((c - lo) * scale).floor_().clamp_(0, num_buckets - 1).long()
            idx[(c < lo) | (c > hi)] = num_buckets  # outside the range: a bucket of its own
            counts += torch.bincount(idx, minlength=num_buckets + 1)
            mins.scatter_reduce_(0, idx, c, 'amin')
            maxs.scatter_reduce_(0, idx, c, 'amax')
        cum = counts[:num_buckets].cumsum(0)
        i = int(torch.searchsorted(cum, cum.new_tensor([k - below]), side='left'))
        below += int(cum[i - 1]) if i > 0 else 0
        n_in, lo, hi = int(counts[i]), float(mins[i]), float(maxs[i])
    j = k - below  # rank of the k-th element inside [lo, hi]
    if lo == hi:
        kth, after = lo, lo if j < n_in else None
    else:
        inside = torch.cat([c[(c >= lo) & (c <= hi)] for c in chunks]).sort().values.tolist()
        kth, after = inside[j - 1], inside[j] if j < len(inside) else None
    if k == x.numel():
        return kth, kth
    if after is None:  # the (k+1)-th is the smallest element above the range
        after = min(float(c.masked_fill(c <= hi, math.inf).min()) for c in chunks)
    return kth, after


def _vim_dim(num_features: int) -> int:
    """The ViM paper's principal-subspace dimension for D-dimensional features."""
    if num_features >= 2048:
        return 1000
    if num_features >= 768:
        return 512
    return num_features // 2


def _whitening(cov: torch.Tensor) -> torch.Tensor:
    """(D, r) matrix A with A A^T = pinv(cov), dropping eigenvalues pinvh would drop."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
    cutoff = eigvals.abs().max() * cov.shape[0] * torch.finfo(cov.dtype).eps
    keep = eigvals > cutoff
    if not keep.any():
        raise ValueError('the features have zero covariance (all identical within each class); '
                         'Mahalanobis needs features that vary')
    return eigvecs[:, keep] / eigvals[keep].sqrt()
