"""The model card of a hub folder: :data:`TEMPLATE` rendered by ``huggingface_hub.ModelCard.from_template``."""
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ['PAPER_CITATION', 'TEMPLATE', 'model_card', 'provenance']

PAPER_CITATION = """@inproceedings{pei2024ssod,
  title     = {Image Background Serves as Good Proxy for Out-of-distribution Data},
  author    = {Pei, Sen},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2307.00519},
  archivePrefix = {arXiv}
}"""

METRICS = (('fpr95', 'FPR95 (%)'), ('auroc', 'AUROC (%)'), ('aupr_in', 'AUPR-In (%)'), ('aupr_out', 'AUPR-Out (%)'))

THRESHOLD_SECTION = """## Rejection thresholds

{% for attribute, score, value in thresholds -%}
{% if value is none -%}
- `model.{{ attribute }}`: none saved with these weights.
{% else -%}
- `model.{{ attribute }} = {{ '%.6g' | format(value) }}`: the `{{ score }}` that keeps 95% of the \
in-distribution validation images ({{ calibration_data }}), at {{ input_size }} px.
{% endif -%}
{% endfor %}
{% if readout -%}
`model.readout = '{{ readout }}'`: `ssod predict` decides with `--rule {{ readout }}` by default, the readout \
chosen for these weights{{ readout_evidence }}.

{% endif -%}
Images below a threshold are rejected as out-of-distribution. A threshold holds for the ID distribution and the \
preprocessing it was calibrated with: after any change of data, preprocessing or input size, recalibrate on your \
own in-distribution validation images with `ssod calibrate <this folder> --val-dir DIR`."""

TEMPLATE = """---
{{ card_data }}
---

{% if ce_only -%}
# {{ name }}: cross-entropy baseline ({{ arch }}), not an SSOD detector

A timm `{{ trunk }}` classifier for {{ num_classes }} classes, trained with cross-entropy alone: the SSOD twin's \
recipe with the OOD loss never on, kept as the baseline it is compared with. It has the architecture's OOD head, \
but that head was **never trained**, so its `ood_factor` carries no information. Score OOD images with a post-hoc \
detector on its logits or features instead (`ssod_zoo.detectors`: MSP, Energy, ODIN, ReAct, KNN, Mahalanobis, \
ViM; `ssod eval --baseline-model`), or with `model.spatial_score(x)`, the mean MaxLogit of its 3 best \
feature-map positions.
{%- else -%}
# {{ name }}: SSOD out-of-distribution detector ({{ arch }})

A timm `{{ trunk }}` classifier for {{ num_classes }} classes with the binary OOD head of SSOD (Pei, ICLR 2024). \
Besides the class logits it gives `ood_factor`, the probability that the image belongs to the training \
distribution (paper Eq. 15): the OOD head is trained on image-background patches that the classifier itself \
rejects, used as stand-ins for OOD data. It also gives `spatial_score`, the classifier read where the object \
is (the mean MaxLogit of the 3 best feature-map positions): the readout that detected OOD images best in \
ssod_zoo's study (see the ssod_zoo README), and the one `ssod predict` decides with unless these weights' \
readout (below) says otherwise.
{%- endif %}

## How to use

```python
import timm, torch
from PIL import Image

model = timm.create_model('hf-hub:<org>/<this-repo>', pretrained=True).eval()  # or 'local-dir:<folder>'
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)
image = Image.open('photo.png').convert('RGB')  # 3 channels, also for grayscale files
x = transform(image).unsqueeze(0)
with torch.no_grad():
    scores = model.forward_scores(x)  # logits, ood_factor, spatial_score: higher = more in-distribution
{%- if has_spatial or has_factor %}
keep = model.accepts(scores{% if not has_spatial %}, readout='factor'{% endif %})  # True: one of the known classes, \
by the readout chosen for these weights
{%- else %}
# no calibrated thresholds yet: set them on ID validation images (ssod calibrate FOLDER --val-dir DIR), then
# keep = model.accepts(scores)
{%- endif %}
{%- if not ce_only and has_spatial and has_factor %}
keep_spatial = model.accepts(scores, readout='spatial')  # spatial_score >= model.spatial_threshold
keep_eq15 = model.accepts(scores, readout='factor')  # the paper's readout: ood_factor >= model.ood_threshold
{%- endif %}
```

`{{ arch }}` is {% if built_in %}registered with timm by the ssod_zoo package{% else %}the SSOD model of timm's \
`{{ trunk }}`, which the ssod_zoo package registers with timm when `timm.create_model` first asks for it{% endif %}: \
installed with pip, ssod_zoo is imported with timm; from a source checkout (`pip install -e`), `import ssod_zoo` first.

""" + THRESHOLD_SECTION + """

## Results

Measured for exactly these weights by the run that produced them (not the paper's numbers).{{ provenance }} \
Convention: in-distribution images are the positive class; FPR95 is the fraction of OOD images kept at the \
threshold that keeps 95% of ID images (lower is better); all values in percent.{% if ood_rows %} The OOD rows \
score `ood_factor`, the paper's Eq. 15, whatever readout these weights decide with (Rejection thresholds, above); \
`ssod eval` reports every readout and baseline.{% elif ce_only and has_ood %} No OOD rows are shown: they would \
score the OOD head, which was never trained; `ssod eval --baseline-model` measures the post-hoc detectors on \
these weights.{% endif %}
{% if id_accuracy is not none %}
ID top-1 accuracy on {{ id_dataset }}: **{{ '%.2f' | format(id_accuracy) }}**
{% endif %}{% if ood_rows %}
| OOD set | FPR95 ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |
|---|---|---|---|---|
{% for row in ood_rows %}{{ row }}
{% endfor %}{% endif %}{% if not has_metrics %}
No metrics were recorded with these weights.
{% endif %}
## Training

{% if train_config -%}
The resolved training configuration:

```json
{{ train_config }}
```
{%- else -%}
No training configuration was recorded with these weights.
{%- endif %}
{% if classes %}
{{ classes }}
{% endif %}
## Intended use

Classifying images of the classes above while flagging inputs that belong to none of them, from the same kind of \
data as {{ id_dataset }}. `ood_factor` is a score, not a guarantee: use it to route images to review or to \
abstain, not as the only safeguard in safety-critical decisions.

## Limitations

- SSOD learns what "out of distribution" looks like from the backgrounds of its own training images. OOD data \
from another domain than those backgrounds (synthetic colour blocks, textures) is its weak spot: the paper reports \
its Texture result on ImageNet (FPR95 45.32%) about 33.76 points worse than KNN's and traces it to Texture images \
that show ImageNet objects (paper Appendix A.5).
- The patch sampler's confidence threshold `gamma` (paper Eq. 12, 0.95 there) decides which patches become ID and \
OOD supervision; the paper reports no ablation of it, so results at other values are untested. Keep the trained \
value when fine-tuning further.
- The rejection threshold is calibrated on one ID validation set; it shifts with the data, preprocessing and input \
size.
- These weights cover only the classes and data they were trained on; they are not ImageNet weights.

## Citation

```bibtex
{{ citation }}
```

Folder and card written by `ssod_zoo.hub.save_pretrained`.
"""


def model_card(config: Dict[str, Any], *, train_config: Optional[Mapping[str, Any]],
               metrics: Optional[Mapping[str, Any]], name: str) -> ModelCard:
    """The card of a folder whose ``config.json`` is ``config``: HF metadata (``model-index``) and :data:`TEMPLATE`."""
    arch, cfg = config['architecture'], config['pretrained_cfg']
    metrics, train_config = dict(metrics or {}), dict(train_config or {})
    id_dataset = id_dataset_name(metrics, train_config)
    ood = dict(metrics.get('ood') or {})
    results: List[EvalResult] = []
    if metrics.get('id_accuracy') is not None:
        results.append(EvalResult(
            task_type='image-classification', task_name='Image Classification', dataset_type=_slug(id_dataset),
            dataset_name=id_dataset, dataset_split=metrics.get('split', 'validation'), metric_type='accuracy',
            metric_name='ID top-1 accuracy (%)', metric_value=round(float(metrics['id_accuracy']), 4)))
    # a cross-entropy model's OOD rows would score a head never trained: the card and the Hub's index leave them out
    ce_only = not ood_head_trained(config, train_config)
    for set_name, values in (ood.items() if not ce_only else ()):
        results += [EvalResult(
            task_type='out-of-distribution-detection', task_name='Out-of-distribution detection',
            dataset_type=_slug(set_name), dataset_name=f'{set_name} (OOD) vs {id_dataset} (ID)',
            metric_type=key, metric_name=label, metric_value=round(float(values[key]), 4))
            for key, label in METRICS if values.get(key) is not None]
    card_data = ModelCardData(
        library_name='timm', license=cfg.get('license', 'apache-2.0'), pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'ssod_zoo', 'out-of-distribution-detection'],
        model_name=name, eval_results=results or None)

    def row(label: str, v: Mapping[str, Any]) -> str:
        return f'| {label} | ' + ' | '.join('-' if v.get(k) is None else f'{float(v[k]):.2f}' for k, _ in METRICS) + ' |'

    ood_rows = [] if ce_only else [row(s, v) for s, v in ood.items()]  # a never-trained head's rows measure nothing
    if ood_rows and metrics.get('ood_average'):
        ood_rows.append(row('**average**', metrics['ood_average']))
    labels = cfg.get('label_names') or []
    classes = (f'Classes ({len(labels)}): ' + ', '.join(f'`{c}`' for c in labels[:20]) +
               (', ...' if len(labels) > 20 else '')) if labels else ''
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE, name=name, arch=arch, trunk=arch.removeprefix('ssod_'),
        built_in=_built_in(arch), has_spatial=(config.get('model_args') or {}).get('spatial_threshold') is not None,
        has_factor=(config.get('model_args') or {}).get('ood_threshold') is not None,
        num_classes=config['num_classes'], thresholds=_thresholds(config, train_config),
        calibration_data=calibration_data(config, id_dataset),
        input_size=_input_size(config), **_readout(config),
        id_dataset=id_dataset, id_accuracy=metrics.get('id_accuracy'), ood_rows=ood_rows,
        has_metrics=bool(metrics), has_ood=bool(ood), provenance=provenance(metrics), classes=classes,
        citation=PAPER_CITATION, ce_only=ce_only,
        train_config=json.dumps(train_config, indent=2, sort_keys=True, default=str) if train_config else '')


def provenance(metrics: Mapping[str, Any]) -> str:
    """The Results section's sentences on which epoch was measured and what chose it, from what ``ssod train``
    records with a checkpoint's metrics (``epoch``, ``epochs``; ``chosen_on``, in ``best.pt``: the OOD validation
    sets whose average FPR95 chose it); '' for metrics without them."""
    if metrics.get('epoch') is None:
        return ''
    text = f' These weights are epoch {metrics["epoch"]} of {metrics.get("epochs", "?")}.'
    chosen = ', '.join(metrics.get('chosen_on') or [])
    if chosen and metrics.get('split') == 'test':
        text += (f" That epoch is the run's `best.pt`, chosen on its validation images (OOD: {chosen}), not on the "
                 'test images below.')
    elif chosen:
        text += (f" They are the run's `best.pt`: the epoch with the lowest average FPR95 on the OOD sets below "
                 f'({chosen}) among those close to the best ID accuracy, so those sets chose the weights they measure '
                 'and the table reads optimistically. Measure on other OOD images with `ssod eval`.')
    return text


def ood_head_trained(config: Mapping[str, Any], train_config: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether the folder's OOD head was trained: a cross-entropy twin (``ce_only``) has one that never was, and
    no ``ood_factor`` threshold means anything for it. Read from ``train_config`` when given, else from the
    ``ood_head_trained`` that :func:`ssod_zoo.save_pretrained` records in ``config.json`` (True when absent)."""
    if train_config:
        return not train_config.get('ce_only')
    return bool(config.get('ood_head_trained', True))


def _thresholds(config: Mapping[str, Any], train_config: Optional[Mapping[str, Any]] = None) -> List[tuple]:
    """(attribute, score it applies to, value) per threshold the card lists; only the spatial one for a model
    whose OOD head was never trained."""
    from .adapter import READOUTS
    model_args = config.get('model_args') or {}
    trained = ood_head_trained(config, train_config)
    return [(r.attribute, r.score, model_args.get(r.attribute)) for name, r in READOUTS.items()
            if trained or name != 'factor']


def _readout(config: Mapping[str, Any]) -> Dict[str, str]:
    """The card's ``readout`` (``model.readout``, or '') and ``readout_evidence``: the OOD validation images it was
    chosen on and each readout's average FPR95 there, as ``ssod calibrate`` records them."""
    readout = (config.get('model_args') or {}).get('readout') or ''
    record = (config.get('calibration') or {}).get('readout') or {}
    evidence = ''
    if readout and record.get('readout') == readout and record.get('fpr95'):
        fpr95 = record['fpr95']
        evidence = (f' on OOD validation images ({", ".join(record.get("ood_data") or ["unnamed"])}): average FPR95 '
                    + ', against '.join(f'{fpr95[r]:.1f}% with `--rule {r}`'
                                        for r in sorted(fpr95, key=lambda r: r != readout)))
        if record.get('margin') is not None:  # the spatial default stays unless another rule beats it by this
            evidence += (' (the spatial default gives way only to a rule lower by more than '
                         f'{record["margin"]:g} points)')
        # thresholds recalibrated later on other ID images, without OOD images, leave the choice as it was made
        id_data = record.get('id_data')
        if id_data and id_data != (config.get('calibration') or {}).get('data'):
            evidence += (f', measured at the thresholds of an earlier calibration on {id_data} (run `ssod calibrate '
                         '--ood-dirs` to choose again at the current ones)')
    return {'readout': readout, 'readout_evidence': evidence}


def _input_size(config: Mapping[str, Any]) -> str:
    size = config['pretrained_cfg'].get('input_size')
    return f'{size[1]}x{size[2]}' if size else 'the configured input size'


def calibration_data(config: Mapping[str, Any], id_dataset: str) -> str:
    """What the thresholds were calibrated on: the ``calibration`` that ``ssod calibrate`` records in
    ``config.json``, else the ID validation data of training (``id_dataset``)."""
    calibration = config.get('calibration') or {}
    if not calibration.get('data'):
        return id_dataset
    return calibration['data'] + (f', {calibration["images"]} images' if calibration.get('images') else '')


def threshold_section(config: Mapping[str, Any]) -> str:
    """:data:`THRESHOLD_SECTION` alone, as :func:`model_card` renders it, for a folder recalibrated in place."""
    import jinja2
    return jinja2.Template(THRESHOLD_SECTION).render(
        thresholds=_thresholds(config), calibration_data=calibration_data(config, 'in-distribution validation set'),
        input_size=_input_size(config), **_readout(config))


def _built_in(arch: str) -> bool:
    """Whether ssod_zoo registers ``arch`` itself (else ``ssod_zoo.register`` made it, for another timm CNN)."""
    from .registry import BUILT_IN
    return arch in BUILT_IN


def id_dataset_name(metrics: Mapping[str, Any], train_config: Mapping[str, Any]) -> str:
    """What the ID data was called: given explicitly, or read off the training config (ssod_zoo.app.train's)."""
    if metrics.get('id_dataset') or train_config.get('dataset'):
        return str(metrics.get('id_dataset') or train_config.get('dataset'))
    if train_config.get('data') == 'synthetic':
        return 'ssod_zoo synthetic benchmark'
    if train_config.get('val_dir'):  # an ImageFolder directory; 'data/pets/val' -> 'pets/val'
        path = Path(str(train_config['val_dir']))
        split = path.name.lower() in ('val', 'valid', 'validation', 'test', 'eval')
        return (f'{path.parent.name}/{path.name}' if split and path.parent.name else path.name) or \
            'in-distribution validation set'
    return 'in-distribution validation set'


def _slug(name: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-') or 'dataset'
