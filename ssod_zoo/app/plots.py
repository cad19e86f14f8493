"""Pictures of an evaluation: ROC curves, ID-vs-OOD score histograms (paper Fig. 6), sampler overlays (Fig. 2)."""
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ..loss import sample_patches
from ..metrics import roc_curve

__all__ = ['plot_roc', 'plot_histograms', 'plot_sampler']


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _ood_sets(scores: Dict[str, Dict[str, torch.Tensor]]) -> list:
    return [k for k in next(iter(scores.values())) if k != 'id']


def plot_roc(scores: Dict[str, Dict[str, torch.Tensor]], path: Path, *, baseline: Optional[str],
             highlight: Sequence[str] = ('ssod_spatial_top3', 'ssod')) -> Path:
    """One panel per OOD set: every method's ROC (ID positive), with the 95%-TPR line where FPR95 is read. The SSOD
    model's readouts are solid, the baselines dashed, the ``highlight`` ones (a deployment's two rules) thick; the
    legend names each method as the results tables do (:func:`report.method_label`)."""
    from .report import method_label
    plt = _pyplot()
    sets = _ood_sets(scores)
    ncol = max(2, min(4, len(sets) + 1))
    legend_rows = -(-len(scores) // ncol)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * max(len(sets), 2), 4.4 + 0.2 * legend_rows),
                             squeeze=False)
    colours = plt.get_cmap('tab20')
    for ax, name in zip(axes[0], sets):
        for i, (method, s) in enumerate(scores.items()):
            fpr, tpr = roc_curve(s['id'], s[name])
            # tab20 pairs a dark and a light shade of each hue: the ten dark ones first, then the light ones
            ax.plot(fpr.numpy(), tpr.numpy(), color=colours((2 * i) % 20 + (i // 10) % 2),
                    lw=2.6 if method in highlight else 1.0,
                    ls='-' if method.startswith('ssod') else '--', label=method_label(method, baseline))
        ax.axhline(0.95, color='k', ls=':', lw=0.8)
        ax.set(title=f'ID vs {name}', xlabel='OOD accepted (FPR)', ylabel='ID accepted (TPR)', xlim=(0, 1),
               ylim=(0, 1.01))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.2 * legend_rows / (4.4 + 0.2 * legend_rows) + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histograms(scores: Dict[str, Dict[str, torch.Tensor]], path: Path,
                    methods: Optional[Sequence[str]] = None,
                    thresholds: Optional[Dict[str, Optional[float]]] = None) -> Path:
    """Rows: methods (default every one scored); columns: OOD sets. ID and OOD score densities overlaid, as in the
    paper's Fig. 6, with each method's deployment threshold drawn where one is given (the SSOD model's two,
    :func:`report.deployed_thresholds`).

    Args:
        scores: method -> {'id': (N,), set: (N_set,)} as ``evaluate`` returns them.
        methods: rows to draw; default all of ``scores``.
        thresholds: method -> threshold on its score (None or missing: no line).
    """
    plt = _pyplot()
    sets = _ood_sets(scores)
    methods = [m for m in (methods or scores) if m in scores]
    thresholds = {k: v for k, v in (thresholds or {}).items() if v is not None}
    fig, axes = plt.subplots(len(methods), len(sets), figsize=(4 * len(sets), 2.8 * len(methods)), squeeze=False)
    for row, method in zip(axes, methods):
        for ax, name in zip(row, sets):
            id_s, ood_s = scores[method]['id'].double().numpy(), scores[method][name].double().numpy()
            lo, hi = float(min(id_s.min(), ood_s.min())), float(max(id_s.max(), ood_s.max()))
            bins = 40
            if not hi - lo > 1e-6 * max(1.0, abs(lo), abs(hi)):  # (near) one value: ODIN at T = 1000 is 1/M +- 1e-8
                bins, pad = 1, 1e-3 * max(1.0, abs(lo))
                lo, hi = lo - pad, hi + pad
            ax.hist(id_s, bins=bins, range=(lo, hi), density=True, alpha=0.55, color='tab:green',
                    label=f'ID (n={len(id_s)})')
            ax.hist(ood_s, bins=bins, range=(lo, hi), density=True, alpha=0.55, color='tab:red',
                    label=f'{name} (n={len(ood_s)})')
            ax.set(title=f'{method}: ID vs {name}', xlabel=f'{method} score (higher = more ID)', ylabel='density')
            if method in thresholds:
                ax.axvline(thresholds[method], color='k', ls='--', lw=1.2,
                           label=f'threshold {thresholds[method]:.3g}')
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_sampler(models: Dict[str, torch.nn.Module], images: torch.Tensor, targets: torch.Tensor, path: Path,
                 mean: Sequence[float], std: Sequence[float], gamma: float = 0.95) -> Path:
    """Which patches each model's classifier samples as ID (green) or OOD (red) on a few training images (Fig. 2).

    Args:
        models: name -> SSOD model (e.g. the CE model before SSOD, and the SSOD model).
        images: (N, 3, H, W) normalised images; targets: (N,) labels.
    """
    plt = _pyplot()
    shown = (images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    fig, axes = plt.subplots(len(models), len(images), figsize=(1.9 * len(images), 2.1 * len(models)),
                             squeeze=False)
    for row, (name, model) in zip(axes, models.items()):
        model.eval()
        labels = sample_patches(model.forward_spatial(images).cls_map, targets, gamma)
        for ax, img, lab in zip(row, shown, labels):
            overlay = torch.zeros(*lab.shape, 4)
            overlay[lab == 1] = torch.tensor([0.0, 0.9, 0.0, 0.45])
            overlay[lab == 0] = torch.tensor([0.95, 0.0, 0.0, 0.45])
            h, w = img.shape[1:]
            ax.imshow(img.permute(1, 2, 0).numpy())
            ax.imshow(overlay.numpy(), extent=(0, w, h, 0), interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, fontsize=9)
    fig.suptitle(f'patches sampled as ID (green, confidence >= {gamma}) and OOD (red, < {1 - gamma:.2f})', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
