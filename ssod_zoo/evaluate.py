"""OOD evaluation: run a model over ID and OOD data once, then score it with SSOD and post-hoc baselines."""
from contextlib import nullcontext
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from .metrics import accuracy, ood_metrics

__all__ = ['collect', 'ssod_report']


@torch.no_grad()
def collect(
        model: nn.Module,
        loader: Iterable,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        progress: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """One pass over a loader, keeping what every score needs (on CPU, float32).

    Returns:
        dict with ``logits`` (N, M), ``ood_factor`` (N,), ``features`` (N, D) pooled pre-logits and
        ``targets`` (N,).
    """
    model.eval()
    out = {'logits': [], 'ood_factor': [], 'features': [], 'targets': []}
    if progress:
        from tqdm.auto import tqdm
        loader = tqdm(loader, desc=progress, leave=False, dynamic_ncols=True)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            features = model.forward_features(x)
            pre_logits = model.forward_head(features, pre_logits=True)
            logits = model.forward_head(features)
            ood_factor = model.forward_ood(pre_logits)
        for k, v in zip(out, (logits, ood_factor, pre_logits, y)):
            out[k].append(v.float().cpu() if v.is_floating_point() else v.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def ssod_report(id_out: Dict[str, torch.Tensor], ood_outs: Dict[str, Dict[str, torch.Tensor]]) -> dict:
    """ID accuracy and SSOD's OOD metrics per OOD set and on average, all in percent (the paper's tables)."""
    report = {'id_accuracy': 100 * accuracy(id_out['logits'], id_out['targets']), 'ood': {}}
    for name, o in ood_outs.items():
        m = ood_metrics(id_out['ood_factor'], o['ood_factor'])
        report['ood'][name] = {k: 100 * float(v) for k, v in m.items()}
    if report['ood']:
        keys = next(iter(report['ood'].values())).keys()
        report['ood_average'] = {k: sum(r[k] for r in report['ood'].values()) / len(report['ood']) for k in keys}
    return report
