r"""Fine-tune a timm classifier into an SSOD model (paper Sec. 2.3 and Appendix A.4).

One process on CPU or GPU:
    python -m ssod_zoo.app.train --model ssod_resnet50 --init resnet50.tv_in1k --data folder \
        --train-dir imagenet/train --val-dir imagenet/val --ood-dirs inat sun
Data-parallel, one node or several (DDP; NCCL on GPU, gloo on CPU):
    torchrun --nproc_per_node=8 -m ssod_zoo.app.train ...
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 -m ssod_zoo.app.train ...

The SSOD settings default to the paper's (gamma 0.95, alpha 1.0, loss-wise balance), and so does the optimiser
(AdamW, lr 1e-4 halved every 30 epochs, ``--lr-step 30``, global batch 256, 224 px; Appendix A.4); the paper states
no epoch count, so ``--epochs`` is this project's, and ``--init`` is empty (from scratch) until you name the
classifier to fine-tune, as the paper does. Every evaluated epoch: ID accuracy and FPR95/AUROC of the OOD factor
(Eq. 15) on the OOD validation set(s); ``best.pt`` keeps the epoch with the best mean FPR95 *of that factor* (not
of the position readout the study recommends: choose your own on validation data) among those with the OOD loss on
and ID accuracy within ``--best-acc-tolerance`` points of the best so far (default: two standard errors of it on
the validation images, at least 1), ``last.pt`` the latest state;
without ``--ood-dirs``, or with ``--ce-only``, there is no ``best.pt``. Checkpoints are written atomically and hold
everything ``--resume`` needs to continue exactly; SIGTERM/SIGINT writes one after the current step (under DDP,
at the next of the steps where the ranks vote, every 10; after an evaluation in progress) and exits; a second
signal stops at once, without one.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch
from timm.optim import create_optimizer_v2
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import wrap
from .cli import AT_LEAST_0, AT_LEAST_1, CROP_PCT, POSITIVE, bounded, device as device_arg, range_error
from .evaluate import collect, ssod_report, thresholds_of
from ..hub import CHECKPOINT_FORMAT, THRESHOLDS
from ..loss import BALANCE_SCHEMES, OOD_RULES, PATCH_MEANS, SSODLoss, SSODLossParts
from .protocols import PROTOCOLS, default_cache


@dataclass
class TrainConfig:
    """What `ssod train` does: one field per flag; :data:`HELP` says what each means (`ssod train --help`)."""
    # model
    model: str = 'ssod_resnet50'
    init: str = ''
    model_kwargs: List[str] = field(default_factory=list)
    # data
    data: str = 'folder'
    data_root: str = ''
    download: bool = False
    train_dir: str = ''
    val_dir: str = ''
    ood_dirs: List[str] = field(default_factory=list)
    synthetic_root: str = ''
    img_size: int = 224
    crop_pct: Optional[float] = None
    scale_min: float = 0.08
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    # objective (Eq. 12-14, Tables 4-5)
    gamma: float = 0.95
    alpha: float = 1.0
    balance: str = 'lwb'
    background_weight: float = 1.0
    label_smoothing: float = 0.0
    ood_rule: str = 'paper'
    exposure: float = 0.0
    warmup_epochs: int = 0
    ce_only: bool = False
    ood_detach: bool = False
    # optimisation (A.4)
    epochs: int = 90
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_step: int = 30
    lr_gamma: float = 0.5
    freeze_bn: bool = False
    max_steps_per_epoch: int = 0
    eval_every: int = 1
    best_acc_tolerance: Optional[float] = None
    # system
    device: str = 'auto'
    amp: str = 'none'
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    out_dir: str = 'runs/ssod'
    resume: str = ''
    export_dir: str = ''
    progress: bool = True


CHOICES = {'data': ('folder', 'synthetic', *PROTOCOLS), 'balance': BALANCE_SCHEMES, 'ood_rule': OOD_RULES,
           'amp': ('none', 'bf16', 'fp16')}

RANGES = {  # the numeric fields' valid values: checked when the flags are parsed, and by train() for API callers
    'img_size': AT_LEAST_1, 'crop_pct': (lambda v: v is None or CROP_PCT[0](v), CROP_PCT[1]),
    'scale_min': (lambda v: 0 < v <= 1, 'in (0, 1]'), 'workers': AT_LEAST_0,
    'gamma': (lambda v: 0.5 < v <= 1, 'in (0.5, 1]'),
    'alpha': AT_LEAST_0, 'background_weight': AT_LEAST_0, 'exposure': AT_LEAST_0,
    'label_smoothing': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'warmup_epochs': AT_LEAST_0, 'epochs': AT_LEAST_1, 'batch_size': AT_LEAST_1, 'lr': AT_LEAST_0,
    'weight_decay': AT_LEAST_0, 'lr_step': AT_LEAST_1, 'lr_gamma': POSITIVE, 'max_steps_per_epoch': AT_LEAST_0,
    'eval_every': AT_LEAST_0, 'best_acc_tolerance': (lambda v: v is None or v >= 0, '>= 0'),
}


HELP = {  # one line per TrainConfig field: `ssod train --help` shows it with the field's default
    'model': 'SSOD architecture (timm.list_models("ssod_*")) or any timm CNN name, wrapped',
    'init': "start from timm weights: a hub tag ('resnet50.tv_in1k') or a local file; '' = from scratch",
    'model_kwargs': 'extra timm.create_model arguments, key=value (e.g. output_stride=16)',
    'data': "'folder' (--train-dir/--val-dir/--ood-dirs), 'synthetic' (the embedded benchmark) or a protocol",
    'data_root': "with --data <protocol>: where its data sets live (see ssod_zoo.app.protocols); '' = $SSOD_ZOO_DATA "
                 'or ./data',
    'download': 'with --data <protocol>: fetch what torchvision can download',
    'train_dir': 'ID training images, one sub-folder per class',
    'val_dir': 'ID validation images, same class sub-folders; calibrates both thresholds',
    'ood_dirs': 'OOD validation folders, one per set (every image under each folder)',
    'synthetic_root': "with --data synthetic: its cache ('' = $SSOD_ZOO_CACHE/synthetic, else "
                      '~/.cache/ssod_zoo/synthetic)',
    'img_size': 'training and evaluation input size, pixels',
    'crop_pct': "evaluation centre-crop fraction (None = the model's pretrained_cfg)",
    'scale_min': 'RandomResizedCrop lower scale bound for training',
    'workers': 'data-loading processes per rank; unless given, min(4, CPU count) on this machine',
    'gamma': 'patch-sampler confidence: ID patches above gamma, OOD below 1 - gamma (Eq. 12)',
    'alpha': 'weight of the OOD loss against classification (Eq. 14)',
    'balance': 'ID/OOD balance of the OOD loss: lwb (loss-wise), lw, dr (Table 5)',
    'background_weight': 'weight of the background (OOD) patches in the OOD loss, with --balance lw only (lwb '
                         'and dr balance the two kinds by their counts)',
    'label_smoothing': 'label smoothing of the classification loss',
    'ood_rule': "OOD patches below 1 - gamma ('paper') or below max(1 - gamma, 0.5 / M) ('chance')",
    'exposure': "beyond the paper: weight of Outlier Exposure's loss (class softmax against uniform) on the "
                'patches the sampler labels OOD, on with the OOD loss (not in warm-up epochs, refused with '
                '--ce-only); with fewer than 1/(1-gamma) classes the uniform target lies above the OOD cutoff, so '
                'the patches it flattens leave the OOD set; 0 = the paper\'s objective',
    'warmup_epochs': 'epochs of classification only before the OOD loss switches on',
    'ce_only': 'the plain cross-entropy baseline: same recipe, OOD loss never on',
    'ood_detach': 'the OOD loss trains the heads only: the OOD head reads a detached feature map, so no OOD '
                  'gradient reaches the backbone (an ablation; the paper trains both)',
    'epochs': 'training epochs',
    'batch_size': 'global batch size, over all ranks; at most the training-set size',
    'lr': 'AdamW learning rate',
    'weight_decay': 'AdamW weight decay',
    'lr_step': 'epochs between learning-rate decays',
    'lr_gamma': 'learning-rate decay factor',
    'freeze_bn': 'freeze BatchNorm statistics (fine-tuning with small per-device batches)',
    'max_steps_per_epoch': 'cap on steps per epoch; 0 = the whole training set',
    'eval_every': 'validate every N epochs; 0 = after the last epoch only',
    'best_acc_tolerance': 'best.pt is chosen among epochs whose ID accuracy is at most this many points below the '
                          'best so far (None = two standard errors of that accuracy on the validation images, at '
                          'least 1 point; 100 = on FPR95 alone, as the paper)',
    'device': "'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...",
    'amp': "mixed precision: 'none', 'bf16', or 'fp16' (with a grad scaler)",
    'channels_last': 'channels-last memory format (faster convolutions on recent GPUs)',
    'compile': 'torch.compile the training step',
    'deterministic': 'deterministic kernels (torch.use_deterministic_algorithms, warning where an op has none): '
                     'on CUDA, a resumed run then repeats an uninterrupted one (its speed cost is not measured)',
    'seed': 'seed of data order, augmentation and initialisation',
    'out_dir': 'where checkpoints, config.json and log.jsonl go',
    'resume': "a checkpoint to continue from, or 'auto' for <out-dir>/last.pt if it exists",
    'export_dir': 'write a hub-ready folder of the best checkpoint here at the end',
    'progress': 'a progress bar per epoch (only when stderr is a terminal; else one line per epoch)',
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def build_parser() -> argparse.ArgumentParser:
    """``ssod train``'s flags, one per :class:`TrainConfig` field, with :data:`HELP` and the field's default."""
    parser = argparse.ArgumentParser(prog='ssod train', description=__doc__, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = '--' + f.name.replace('_', '-')
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_ = HELP.get(f.name, f.name.replace('_', ' '))
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.type == List[str]:
            parser.add_argument(flag, nargs='*', default=default, help=help_)
        else:
            kind = {int: int, float: float, Optional[float]: float}.get(f.type, str)
            kind = _device_flag if f.name == 'device' else kind
            parser.add_argument(flag, type=bounded(kind, *RANGES[f.name]) if f.name in RANGES else kind,
                                default=default, choices=CHOICES.get(f.name), help=help_)
    return parser


def _device_flag(text: str) -> str:
    """``--device``: 'auto', or a device this machine has (cli.device: refused at parsing, as eval's)."""
    return text if text == 'auto' else device_arg(text)


READ_EVERY = 10  # training steps between reads of the loss sums (host syncs), the NaN check and DDP's stop vote


class TrainError(Exception):
    """A problem with the user's input: reported as one clear line, not a traceback."""


def main(argv: Optional[List[str]] = None) -> dict:
    cfg = parse_args(argv)
    try:
        return train(cfg)
    except UnreadableImage:  # from the loop or a DataLoader worker (whose message wraps a traceback)
        print(f'ssod train: error: {_unreadable_report(cfg)}', file=sys.stderr)
        raise SystemExit(2)
    except TrainError as e:
        # every rank of a node finds the same bad setting or missing file (they share its file system): its first
        # rank says it, once per node, and names itself on a node other than the first
        rank = int(os.environ.get('RANK', 0))
        if int(os.environ.get('LOCAL_RANK', 0)) == 0:
            print(f'ssod train: error{f" (rank {rank})" if rank else ""}: {e}', file=sys.stderr)
        raise SystemExit(2)


CUBLAS_WORKSPACE = 'CUBLAS_WORKSPACE_CONFIG'  # cuBLAS's workspace setting, read once per process


def _restores_process_state(fn):
    """The SIGTERM/SIGINT handlers ``_StopFlag`` installs and ``--deterministic``'s kernel settings are the run's,
    not the caller's: put the caller's back on any exit, so Ctrl-C interrupts a notebook or sweep again after an
    in-process run, and its later work runs with its own kernels (and its own ``CUBLAS_WORKSPACE_CONFIG``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        kernels = (torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(),
                   torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
        workspace = os.environ.get(CUBLAS_WORKSPACE)
        try:
            return fn(*args, **kwargs)
        finally:
            for s, handler in saved.items():
                if handler is not None:  # None: installed outside Python, cannot be put back from here
                    signal.signal(s, handler)
            torch.use_deterministic_algorithms(kernels[0], warn_only=kernels[1])
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = kernels[2:]
            if workspace is None:
                os.environ.pop(CUBLAS_WORKSPACE, None)
            else:
                os.environ[CUBLAS_WORKSPACE] = workspace
    return wrapper


def _use_deterministic_kernels() -> None:
    """``--deterministic``: the kernels that have a deterministic variant use it (cuDNN's convolution backward
    passes among them), and the ones that have none warn. cuBLAS reads its workspace setting once per process,
    when it starts: set here, it holds only if nothing in the process used CUDA before the run."""
    if CUBLAS_WORKSPACE not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            print(f'warning: --deterministic in a process that already used CUDA: cuBLAS may have started with its '
                  f'default workspace. For deterministic matrix products start the process with '
                  f'{CUBLAS_WORKSPACE}=:4096:8 set', file=sys.stderr)
        os.environ[CUBLAS_WORKSPACE] = ':4096:8'
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True


@_restores_process_state
def train(cfg: TrainConfig) -> dict:
    # ---------------------------------------------------------------------------------------------- setup
    for name, (accepts, what) in RANGES.items():
        error = range_error(getattr(cfg, name), accepts, what)
        if error:
            raise TrainError(f'--{name.replace("_", "-")} {error}, got {getattr(cfg, name)}')
    if cfg.ce_only and cfg.exposure:  # the exposure trains on the OOD patches of the SSOD objective, never on here
        raise TrainError(f'--exposure {cfg.exposure:g} acts with the OOD loss, which --ce-only never switches on: '
                         'drop one of them (a cross-entropy model with Outlier Exposure is not a recipe here)')
    cfg = _resumed_config(cfg)
    if not cfg.ce_only and cfg.warmup_epochs >= cfg.epochs:  # the run would publish an untrained OOD head
        raise TrainError(f'--warmup-epochs {cfg.warmup_epochs} leaves none of the {cfg.epochs} epochs to the OOD loss, '
                         'so the OOD head would never train: raise --epochs above it, or pass --ce-only for a '
                         'classifier alone')
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if cfg.batch_size % world:
        raise TrainError(f'--batch-size {cfg.batch_size} (global) is not divisible by the {world} ranks')
    if cfg.deterministic:
        _use_deterministic_kernels()
    device = _device(cfg.device, local_rank)
    ddp = world > 1
    if ddp:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    master = rank == 0
    _seed_everything(cfg.seed)
    out_dir = Path(cfg.out_dir)  # made once the run has passed its checks: a refused one leaves no empty folder
    amp_dtype = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[cfg.amp]

    # ----------------------------------------------------------------------------------------------- data
    datasets = _datasets(cfg, master)
    _check_eval_images(cfg)
    class_names = datasets['train'].classes
    model = _model(cfg, num_classes=len(class_names))
    train_tf, eval_tf = _transforms(model, cfg)
    # the model carries the preprocessing it is trained with: checkpoints, hub folders, eval and export read it
    model.pretrained_cfg = {**model.pretrained_cfg, **eval_data_config(model, cfg)}
    train_set = _SeededTransform(datasets['train'], train_tf, cfg.seed)
    eval_sets = {k: _SeededTransform(v, eval_tf, cfg.seed) for k, v in datasets.items() if k != 'train'}
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        fits = max(world, 2 ** int(math.log2(max(1, len(train_set)))) // world * world)
        raise TrainError(f'the training set has {len(train_set)} images, fewer than one global batch of '
                         f'{cfg.batch_size}: pass --batch-size {fits} (or less)')
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if master:  # what is about to run, before the first epoch's minutes of silence in a log file
        print(f'training {cfg.model} on {device}' + (f' x {world} ranks ({dist.get_backend()})' if ddp else '') +
              f': {len(train_set)} images of {len(class_names)} classes, {steps_per_epoch} steps of '
              f'{cfg.batch_size} per epoch, {cfg.epochs} epochs, into {out_dir}', flush=True)
    if master and not cfg.ce_only:
        _warn_small_map(model, cfg)  # on the CPU, before the model moves
    if master and cfg.ce_only and cfg.ood_dirs:
        print('note: --ce-only: the OOD sets are scored for the log, but no best.pt is kept (it is chosen on the OOD '
              'factor, which this run never trains): the model is last.pt', file=sys.stderr)

    # ---------------------------------------------------------------------------------------------- model
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    step_module = _SpatialForward(model, detach_ood=cfg.ood_detach)
    if cfg.compile:
        step_module = torch.compile(step_module)
    if ddp:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[local_rank] if device.type == 'cuda' else None)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    criterion = SSODLoss(cfg.gamma, cfg.alpha, cfg.balance, cfg.background_weight, cfg.label_smoothing,
                         count_reducer=_all_reduce_sum if ddp else None, world_size=world, ood_rule=cfg.ood_rule,
                         exposure=cfg.exposure)

    start_epoch, start_step, best, epoch_sums = 0, 0, {'fpr95': math.inf, 'epoch': -1}, None
    resume = _resume_path(cfg, out_dir)
    if not resume and (out_dir / 'last.pt').exists():  # a second run would append to its log and replace best.pt
        raise TrainError(f'{out_dir} already holds a run (last.pt): continue it with --resume auto, or give a new '
                         '--out-dir')
    if resume:
        ckpt = _load_resume(resume, cfg, class_names, model)
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        scaler.load_state_dict(ckpt['scaler'])
        start_epoch, start_step, best = ckpt['epoch'], ckpt['step'], ckpt['best']
        epoch_sums = ckpt.get('epoch_sums')  # the interrupted epoch's loss sums so far, so its log covers all of it
        if epoch_sums is not None and len(epoch_sums) != len(SSODLossParts._fields):  # saved with fewer parts
            epoch_sums = None  # (before exposure_loss): the resumed epoch's log then covers its remaining steps
        if start_epoch >= cfg.epochs:
            if master:
                print(f'{resume} has already finished all {start_epoch} epochs; nothing to train (raise --epochs to '
                      'continue it, or start a new --out-dir)')
            _cleanup(ddp)
            return {'history': [], 'best': best, 'out_dir': str(out_dir), 'model': model, 'finished': True}
        if master:
            print(f'resumed from {resume}: epoch {start_epoch + 1}, after its first {start_step} step'
                  f'{"s" * (start_step != 1)}')
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def checkpoint(epoch: int, step: int, metrics: Optional[dict] = None) -> dict:
        return {
            'format': CHECKPOINT_FORMAT, 'architecture': model.pretrained_cfg['architecture'],
            'model_args': _model_args(cfg, len(class_names)), 'model': model.state_dict(),
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'scaler': scaler.state_dict(), 'epoch': epoch, 'step': step, 'best': best,
            'config': dataclasses.asdict(cfg),
            'metrics': {**metrics, 'epoch': epoch, 'epochs': cfg.epochs} if metrics else {},
            **{k: getattr(model, k) for k in THRESHOLDS}, 'class_names': class_names,
            'data_config': eval_data_config(model, cfg),
        }

    run = _Run(cfg, model, step_module, criterion, optimizer, scaler, autocast, device, rank, world, out_dir,
               train_set, steps_per_epoch, _StopFlag(speak=master), checkpoint)
    history = []
    # ---------------------------------------------------------------------------------------------- train
    for epoch in range(start_epoch, cfg.epochs):
        ood_on = not cfg.ce_only and epoch >= cfg.warmup_epochs
        train_log = _train_epoch(run, epoch, start_step, ood_on, epoch_sums)
        start_step, epoch_sums = 0, None
        with warnings.catch_warnings():
            if 'img_s' not in train_log:  # resumed after the epoch's last step: the step was taken before the stop
                warnings.filterwarnings('ignore', message=r'Detected call of `lr_scheduler\.step\(\)` before')
            scheduler.step()
        if master and ood_on:
            _warn_starved_sampler(train_log, cfg, len(class_names))

        # ------------------------------------------------------------------------------------- evaluate
        last = epoch + 1 == cfg.epochs
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            if ddp:
                _sync_buffers(model)
            metrics = _evaluate(model, eval_sets, cfg, device, amp_dtype, rank, world)
            for k in THRESHOLDS:
                setattr(model, k, metrics.pop(k))
        else:
            metrics = {}
        best, is_best = _update_best(best, metrics, epoch, ood_on, cfg.best_acc_tolerance, len(eval_sets['val']))
        record = {'epoch': epoch + 1, 'lr': optimizer.param_groups[0]['lr'], 'ood_loss_on': ood_on,
                  'train': train_log, 'val': metrics, 'best_epoch': best['epoch'] + 1}
        history.append(record)
        if master:
            state = checkpoint(epoch + 1, 0, metrics)
            _save_atomic(state, out_dir / 'last.pt')
            if is_best:  # chosen on these OOD sets: a card made from it says so (_card.provenance)
                _save_atomic({**state, 'metrics': {**state['metrics'], 'chosen_on': list(metrics['ood'])}},
                             out_dir / 'best.pt')
            with open(out_dir / 'log.jsonl', 'a') as f:
                f.write(json.dumps(record) + '\n')
            print(_summary(record))

    if master and cfg.export_dir:
        from ..hub import load_checkpoint, save_pretrained
        source = out_dir / ('best.pt' if (out_dir / 'best.pt').exists() else 'last.pt')
        best_model, ckpt = load_checkpoint(source)
        save_pretrained(best_model, cfg.export_dir, train_config=ckpt['config'], metrics=ckpt['metrics'],
                        class_names=ckpt['class_names'])  # load_checkpoint gave the model both thresholds
        print(f'hub-ready folder of {source.name} written to {cfg.export_dir}')
    _cleanup(ddp)
    return {'history': history, 'best': best, 'out_dir': str(out_dir), 'model': model}


def _update_best(best: dict, metrics: dict, epoch: int, ood_on: bool, tolerance: Optional[float] = None,
                 images: int = 0):
    """``(best, is_best)`` after an epoch's validation ``metrics`` (empty when it was not evaluated).

    ``best.pt`` is the epoch with the lowest mean FPR95 of the OOD factor among the *eligible* epochs: the OOD loss
    was on (a warm-up epoch's OOD head is untrained, and its accuracy is not compared: the OOD loss may cost some),
    and its ID accuracy is at most ``tolerance`` points below the best accuracy of those epochs so far, so that an
    early epoch that detects well but classifies badly is not kept. When a later epoch's accuracy leaves the kept
    one more than ``tolerance`` behind, that epoch replaces it, whatever its FPR95 (the epochs in between were not
    saved). The first of equal FPR95s stays.

    ``tolerance`` None: two standard errors of the best accuracy so far, measured on ``images`` validation images
    (``100 sqrt(p (1 - p) / images)`` each), and at least 1 point: a gap within the noise of the accuracy's own
    measurement does not outweigh a better FPR95 (1.8 points at 94% on 600 images, 13 at 90% on 21).
    """
    if 'id_accuracy' not in metrics or not ood_on:
        return best, False
    accuracy = metrics['id_accuracy']
    top = max(best.get('top_accuracy', -math.inf), accuracy)  # checkpoints from before the rule: no accuracies
    best = {**best, 'top_accuracy': top}
    if tolerance is None:
        from .calibrate import spread_points  # the binomial spread, as calibrate and eval warn with it
        tolerance = max(1.0, 2 * spread_points(max(images, 1), min(max(top / 100, 0.0), 1.0)))
    fpr = metrics.get('ood_average', {}).get('fpr95', math.nan)
    if math.isnan(fpr) or accuracy < top - tolerance:
        return best, False
    behind = best.get('id_accuracy', math.inf) < top - tolerance
    if fpr < best['fpr95'] or behind:
        return {'fpr95': fpr, 'epoch': epoch, 'id_accuracy': accuracy, 'top_accuracy': top}, True
    return best, False


# ------------------------------------------------------------------------------------------------ the epoch loop
@dataclass
class _Run:
    """What a training step touches, built once by :func:`train`."""
    cfg: TrainConfig
    model: nn.Module
    step_module: nn.Module  # forward_spatial, under DDP / torch.compile when asked
    criterion: SSODLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    device: torch.device
    rank: int
    world: int
    out_dir: Path
    train_set: Dataset
    steps_per_epoch: int
    stop: '_StopFlag'
    checkpoint: Callable[..., dict]  # (epoch, step, metrics=None) -> the resumable state


def _train_epoch(run: _Run, epoch: int, start_step: int, ood_on: bool,
                 epoch_sums: Optional[List[float]] = None) -> dict:
    """One epoch from ``start_step``: forward_spatial, the SSOD loss (classification only when not ``ood_on``),
    backward, optimizer step. SIGTERM/SIGINT save a resumable ``last.pt``, with the loss sums of the steps done
    (``epoch_sums``, given back here on resume), and exit.

    Returns:
        The epoch's mean loss parts (``loss``, ``cls_loss``, ``frac_id``, ...) and ``img_s``.
    """
    cfg, model, device, world = run.cfg, run.model, run.device, run.world
    ddp, master = world > 1, run.rank == 0
    run.train_set.set_epoch(epoch)
    batches = _GlobalBatches(len(run.train_set), cfg.batch_size, run.rank, world, cfg.seed, epoch,
                             start_step, run.steps_per_epoch)
    loader = DataLoader(run.train_set, batch_sampler=batches, num_workers=cfg.workers,
                        pin_memory=device.type == 'cuda', persistent_workers=False)
    model.train()
    if cfg.freeze_bn:
        _freeze_bn(model)
    sums, device_sums, seen, n, t0 = {}, None, 0, 0, time.perf_counter()
    # the global sums of the steps an interrupted run did before this one resumed it (0 when it started the epoch)
    done = torch.tensor(epoch_sums, device=device) if epoch_sums is not None else 0.0
    done_steps = start_step if epoch_sums is not None else 0
    bar = _progress(loader, cfg.progress and master, f'epoch {epoch + 1}/{cfg.epochs}', start_step,
                    run.steps_per_epoch)
    for step, (x, y) in enumerate(bar, start=start_step):
        # a step's randomness (dropout, drop_path, --balance dr) is its seed's, epoch's, step's and rank's: a resumed
        # run draws what the interrupted one would have, and the ranks draw masks of their own
        torch.manual_seed(_step_seed(cfg.seed, epoch, step, run.rank))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with run.autocast:
            out = run.step_module(x)
        parts = run.criterion(out, y, ood=ood_on)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(parts.loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()

        seen += x.shape[0] * world
        # summed on the device and read (one host sync) every READ_EVERY steps, like nanoGPT's log_interval:
        # a float() per loss part, a NaN check and the stop flag's all-reduce each step stall a GPU
        step_parts = torch.stack([v.detach().float() for v in parts])
        device_sums = step_parts if device_sums is None else device_sums + step_parts
        n = done_steps + step - start_step + 1  # steps in the sums
        read = (step - start_step + 1) % READ_EVERY == 0 or step + 1 == run.steps_per_epoch
        if read:
            sums = dict(zip(parts._fields, (_over_ranks(device_sums, parts._fields, world) + done).tolist()))
            if not math.isfinite(sums['loss']):
                last = run.out_dir / 'last.pt'
                raise TrainError(f'the loss became {sums["loss"]} at epoch {epoch + 1} by step {step + 1}; lower '
                                 '--lr, or with --amp fp16 try --amp bf16. ' +
                                 (f'The last good state is {last} (--resume auto)' if last.exists() else
                                  'No checkpoint was written before it.'))
            if hasattr(bar, 'set_postfix'):
                bar.set_postfix(loss=f'{sums["loss"] / n:.3f}', ce=f'{sums["cls_loss"] / n:.3f}',
                                id=f'{sums["frac_id"] / n:.0%}', ood=f'{sums["frac_ood"] / n:.0%}',
                                img_s=f'{seen / (time.perf_counter() - t0):.0f}')
        if (read or not ddp) and run.stop.requested(ddp):  # free in one process, an all-reduce under DDP
            # the epoch's global sums so far (under DDP every rank is here, at a read step, for the all-reduce)
            so_far = (_over_ranks(device_sums, parts._fields, world) + done).tolist()
            if master:
                _save_atomic({**run.checkpoint(epoch, step + 1), 'epoch_sums': so_far}, run.out_dir / 'last.pt')
                print(f'interrupted: resumable checkpoint at {run.out_dir / "last.pt"}; continue with --resume auto')
            _cleanup(ddp)
            raise SystemExit(128 + (run.stop.signum or signal.SIGTERM))
    if not sums and epoch_sums is not None:  # resumed after the epoch's last step: its sums are all in the checkpoint
        sums, n = dict(zip(SSODLossParts._fields, epoch_sums)), done_steps
    train_log = {k: v / max(n, 1) for k, v in sums.items()}
    if seen:  # (none when resumed after the epoch's last step)
        train_log['img_s'] = seen / (time.perf_counter() - t0)
    return train_log


# ------------------------------------------------------------------------------------------------ helpers
def _over_ranks(sums: torch.Tensor, fields: Sequence[str], world: int) -> torch.Tensor:
    """The logged loss parts of the whole global batch, not rank 0's share. Each rank's loss, classification loss
    and patch fractions are its own means (averaged over ranks); its patch-loss parts (:data:`PATCH_MEANS`) are its
    patch sums over the global patch counts (summed over ranks). One all-reduce, only when the sums are read."""
    if world == 1:
        return sums
    sums = _all_reduce_sum(sums.clone())
    summed = torch.tensor([f in PATCH_MEANS for f in fields], device=sums.device)
    return torch.where(summed, sums, sums / world)


class _SpatialForward(nn.Module):
    """DDP and torch.compile wrap ``forward``; training needs ``forward_spatial``. With ``detach_ood`` the OOD map
    is recomputed from the detached feature map, so the OOD loss reaches the heads but not the backbone."""

    def __init__(self, model: nn.Module, detach_ood: bool = False):
        super().__init__()
        self.model = model
        self.detach_ood = detach_ood

    def forward(self, x: torch.Tensor):
        out = self.model.forward_spatial(x)
        if self.detach_ood:
            out = out._replace(ood_map=self.model.forward_positions(out.features.detach())[1])
        return out


class _SeededTransform(Dataset):
    """Applies the transform with an RNG seeded by (seed, epoch, index): augmentation is a pure function of
    those, whatever the worker count, rank or resume point, so a resumed run repeats the same images."""

    def __init__(self, dataset: Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        # seeded inside a fork of the global RNGs: with --workers 0 this runs in the training process, whose RNG
        # (dropout, DR resampling) must not depend on how many images were loaded
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            try:
                return self.transform(image), label
            finally:
                random.setstate(python_state)


class _GlobalBatches:
    """Batch sampler over one permutation per (seed, epoch). Global batch b is the same images for any number
    of ranks (rank r takes its r-th slice), so N ranks see what one process with the global batch sees."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epoch: int,
                 start: int, steps: int):
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.epoch, self.start, self.steps = seed, epoch, start, steps

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        local = self.global_batch // self.world
        for b in range(self.start, self.steps):
            lo = b * self.global_batch + self.rank * local
            yield perm[lo:lo + local].tolist()


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step (all ranks agree under DDP); a second one stops at
    once, without a checkpoint (an evaluation, say, is not interrupted by the first)."""

    def __init__(self, speak: bool = True):
        self.signum, self.pid, self.speak = None, os.getpid(), speak  # speak: the one rank that prints
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker, forked with this handler: the main process decides
            return
        if self.signum is not None:  # the second: the user does not want to wait
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        if not self.speak:
            return
        print(f'{signal.Signals(signum).name}: stopping with a resumable checkpoint after the current step (under '
              'DDP the next step where the ranks vote; after an evaluation in progress); send it again to stop at '
              'once without one', file=sys.stderr, flush=True)

    def requested(self, ddp: bool) -> bool:
        flag = self.signum is not None
        if ddp:
            t = torch.tensor([float(flag)], device=_dist_device())
            dist.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag


def _dist_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _device(name: str, local_rank: int) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 4099 + rank) % 2 ** 63


def _save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file, fsync, rename: a kill mid-write never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's factory: AdamW (the paper's, A.4) with no weight decay on norms, biases and ``no_weight_decay()``."""
    return create_optimizer_v2(model, opt='adamw', lr=cfg.lr, weight_decay=cfg.weight_decay)


def _parse_model_kwargs(items: List[str]) -> dict:
    """``['output_stride=16', 'drop_rate=0.1']`` -> kwargs, parsed as timm's train.py parses ``--model-kwargs``
    (``timm.utils.ParseKwargs``: Python literals, anything else a string). The config keeps the list: it is
    saved as JSON beside every checkpoint."""
    from timm.utils import ParseKwargs
    bad = [item for item in items if '=' not in item]
    if bad:
        raise TrainError(f'--model-kwargs takes key=value pairs, got {bad[0]!r}')
    parsed = argparse.Namespace()
    ParseKwargs(option_strings=[], dest='kwargs')(None, parsed, list(items))
    return parsed.kwargs


def _model_args(cfg: TrainConfig, num_classes: int) -> dict:
    return {'num_classes': num_classes, **_parse_model_kwargs(cfg.model_kwargs)}


def _model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    try:
        model = timm.create_model(cfg.model, **_model_args(cfg, num_classes))
        if not hasattr(model, 'forward_spatial'):
            model = wrap(model)  # any timm CNN
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise TrainError(f'unknown model {cfg.model!r}: give one of {", ".join(timm.list_models("ssod_*"))}, '
                             'or any timm CNN\'s name (timm.list_models() lists them)')
        raise
    except (TypeError, ValueError) as e:  # a ViT (wrap, or register for ssod_<vit>); a --model-kwargs key
        if 'is not a CNN SSOD can use' in str(e):
            raise TrainError(f'--model {cfg.model}: {str(e).split("): ", 1)[-1]}') from None
        if 'unexpected keyword argument' not in str(e) or not cfg.model_kwargs:
            raise
        raise TrainError(f'--model-kwargs {" ".join(cfg.model_kwargs)}: {cfg.model} does not take '
                         f'{"it" if len(cfg.model_kwargs) == 1 else "one of them"} ({e}); '
                         'timm.create_model passes these to the architecture\'s constructor') from None
    resumed = _resumed_preprocessing(_resume_path(cfg, Path(cfg.out_dir)))
    if resumed is not None:  # the checkpoint holds every weight: --init is not read again (it may be gone)
        model.pretrained_cfg = {**model.pretrained_cfg, **resumed}
    elif cfg.init:
        _load_init(model, cfg.init, num_classes)
    model.ood_head_trained = not cfg.ce_only  # as load_checkpoint reads it back from the config
    return model


# what a model's weights were trained with, besides the input size (which --img-size sets)
_PREPROCESSING_KEYS = ('crop_pct', 'crop_mode', 'mean', 'std', 'interpolation')


def _resumed_preprocessing(path: Optional[Path]) -> Optional[dict]:
    """The preprocessing a checkpoint to resume was trained with (which --init brought), or None: no checkpoint,
    or one from before checkpoints recorded it (then --init gives it again)."""
    try:
        data_config = torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('data_config') \
            if path is not None else None
    except Exception:
        return None  # _load_resume reports an unreadable checkpoint
    return {k: data_config[k] for k in _PREPROCESSING_KEYS if k in data_config} if data_config else None


def _load_init(model: nn.Module, init: str, num_classes: int) -> None:
    """Weights to start from, with the preprocessing they were trained with (crop, mean, std, interpolation).

    ``init`` is an SSOD model spec (``ssod_zoo.load_model``: a training checkpoint, a hub folder, ``local-dir:``,
    ``hf-hub:``, an ``ssod_*`` tag; its OOD head comes too), a timm tag (``resnet50.tv_in1k``) or a timm-format
    weights file; for the last two the OOD head starts fresh. A classifier for another class count is dropped.
    """
    from ..hub import CHECKPOINT_FORMAT as _FORMAT, WeightsError, load_model
    path = Path(init)
    source = None
    if not path.exists() and (path.suffix in ('.pth', '.pt', '.bin', '.safetensors', '.ckpt') or os.sep in init
                              and not init.startswith(('hf-hub:', 'local-dir:'))):
        raise TrainError(f'--init {init}: no such file or folder (a timm tag such as resnet50.tv_in1k, a hub '
                         'folder, hf-hub:ORG/REPO or a weights file)')
    try:
        if path.is_file():
            head = torch.load(path, map_location='cpu', weights_only=True) if path.suffix != '.safetensors' else None
            if isinstance(head, dict) and head.get('format') == _FORMAT:
                source = load_model(path)
            else:
                from timm.models import load_state_dict
                state = load_state_dict(init, weights_only=True)
        elif path.is_dir() or init.startswith(('hf-hub:', 'local-dir:')) or init.startswith('ssod_'):
            source = load_model(init)
        else:  # a timm tag, with its own classifier: a class-count change is reported below like any other
            source = timm.create_model(init, pretrained=True, **_cached_hub_weights(init))
    except (WeightsError, RuntimeError, OSError, ValueError) as e:
        raise TrainError(f'--init {init!r} is neither a file nor loadable weights: {str(e).splitlines()[0]}')
    if source is not None:
        state = source.state_dict()
        model.pretrained_cfg = {**model.pretrained_cfg, **{k: source.pretrained_cfg[k] for k in _PREPROCESSING_KEYS
                                                           if source.pretrained_cfg.get(k) is not None}}
    own = model.state_dict()
    classifier = model.pretrained_cfg['classifier']
    dropped = {}
    for k in [k for k in state if k.startswith(classifier + '.')]:
        if k in own and state[k].shape[0] != own[k].shape[0] and state[k].shape[1:] == own[k].shape[1:]:
            dropped[k] = state.pop(k).shape[0]  # another class count: new classifier
    missing = [k for k in own if k not in state and not k.startswith('ood_head.')]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or resized or any(not k.startswith(classifier + '.') for k in missing):
        found = [f'{len(keys)} {what} (e.g. {", ".join(keys[:2])})' for keys, what in (
            (unexpected, 'unexpected keys'), (missing, 'missing'), (resized, 'of another shape')) if keys]
        raise TrainError(f'--init {init!r} does not fit {model.pretrained_cfg["architecture"]}: {", ".join(found)}')
    if dropped and int(os.environ.get('RANK', 0)) == 0:  # it fits: say what is left out
        print(f'--init {init}: its classifier has {next(iter(dropped.values()))} classes, the data {num_classes}; '
              'the classifier starts fresh, the rest comes from --init', file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='loading a checkpoint without an OOD head')
        model.load_state_dict({**own, **state})


def _cached_hub_weights(init: str) -> dict:
    """For a timm tag: load from the Hugging Face cache if it holds the weights (no network round trips), else
    fail in one line, at once, when the Hub cannot be reached (huggingface_hub would retry for a minute)."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants, try_to_load_from_cache
    try:
        cfg = timm.models.get_pretrained_cfg(init)
    except Exception:
        return {}
    repo = getattr(cfg, 'hf_hub_id', None)
    if not repo:
        return {}
    for name in dict.fromkeys([getattr(cfg, 'hf_hub_filename', None) or 'model.safetensors', 'model.safetensors',
                               'pytorch_model.bin']):
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return {'pretrained_cfg_overlay': {'file': cached}}
    if constants.is_offline_mode():
        why = 'HF_HUB_OFFLINE is set'
    elif os.environ.get('HTTPS_PROXY') or os.environ.get('https_proxy'):
        return {}  # through a proxy a direct probe says nothing
    else:
        try:
            socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
            return {}
        except OSError as e:
            why = f'{constants.ENDPOINT} cannot be reached ({e})'
    raise TrainError(f'--init {init}: its weights ({repo}) are not in the Hugging Face cache and {why}; download '
                     f'them once with network access (`hf download {repo}`), or pass a local weights file to --init')


def eval_data_config(model: nn.Module, cfg: TrainConfig) -> dict:
    """timm's data config for evaluation at the training size and crop (the model's pretrained_cfg otherwise)."""
    args = {'input_size': (3, cfg.img_size, cfg.img_size)}
    if cfg.crop_pct is not None:
        args['crop_pct'] = cfg.crop_pct
    data_cfg = timm.data.resolve_data_config(args, model=model)
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data_cfg.items()}


def _transforms(model: nn.Module, cfg: TrainConfig):
    data_cfg = eval_data_config(model, cfg)
    train_tf = timm.data.create_transform(**data_cfg, is_training=True, scale=(cfg.scale_min, 1.0))
    eval_tf = timm.data.create_transform(**data_cfg, is_training=False)
    return train_tf, eval_tf


def _image_folder(path: str, what: str):
    from torchvision.datasets import ImageFolder
    if not path:
        raise TrainError(f'--{what} is required with --data folder')
    if not Path(path).is_dir():
        raise TrainError(f'--{what} {path!r} is not a directory')
    try:
        return ImageFolder(path, loader=_checked_loader)
    except FileNotFoundError as e:
        raise TrainError(f'--{what} {path!r}: {e} (expected one sub-directory of images per class)')


class UnreadableImage(TrainError):
    """An image file of the user's folders cannot be decoded; :func:`main` then lists every such file."""


def _checked_loader(path: str):
    from .images import ImageError, read_image
    try:
        return read_image(path)
    except ImageError as e:
        raise UnreadableImage(str(e)) from None


def _check_eval_images(cfg: TrainConfig) -> None:
    """The validation and OOD folders are first read after an epoch of training, which a bad file would then cost:
    a header check of each of their files now (fast; a file cut short still shows only when it is read)."""
    if cfg.data in PROTOCOLS or cfg.data == 'synthetic':
        return
    from .images import list_images, unreadable
    files = (p for d in (cfg.val_dir, *cfg.ood_dirs) if d for p in list_images(d))
    for path, why in unreadable(files, decode=False):  # the first one stops it; the report names them all
        raise UnreadableImage(f'cannot read image {path} ({why})')


def _unreadable_report(cfg: TrainConfig, shown: int = 3) -> str:
    """One line: how many images of the run's folders cannot be read, and the first few (each file decoded, only
    after one failed, so a large folder is reported in one go rather than one crash at a time)."""
    from .images import list_images, unreadable_report
    folders = [d for d in (cfg.train_dir, cfg.val_dir, *cfg.ood_dirs) if d]
    return (unreadable_report(sorted(p for d in folders for p in list_images(d)), shown)
            or 'an image could not be read while training, but every file reads now; check the storage')


def _datasets(cfg: TrainConfig, master: bool) -> Dict[str, Dataset]:
    if cfg.data in PROTOCOLS:
        if cfg.download and dist.is_initialized():  # rank 0 downloads, the others read what it fetched
            if master:
                _protocol_or_error(cfg, download=True)
            dist.barrier()
        p = _protocol_or_error(cfg, download=cfg.download and not dist.is_initialized())
        out = {'train': p.train, 'val': p.val}
        out.update({f'ood/{k}': v for k, v in p.ood_val.items()})
        return out
    if cfg.data == 'synthetic':
        from .synthetic import SyntheticBenchmark
        root = cfg.synthetic_root or default_cache() / 'synthetic'
        bench = SyntheticBenchmark(root)
        if master:
            bench.prepare(progress=cfg.progress)
        if dist.is_initialized():
            dist.barrier()
        out = {'train': bench.train_dataset(), 'val': bench.val_dataset()}
        out.update({f'ood/{k}': v for k, v in bench.ood_datasets().items()})
        return out
    out = {'train': _image_folder(cfg.train_dir, 'train-dir'), 'val': _image_folder(cfg.val_dir, 'val-dir')}
    if out['val'].classes != out['train'].classes:
        val, train_ = out['val'].classes, out['train'].classes
        missing, extra = [c for c in train_ if c not in val], [c for c in val if c not in train_]
        raise TrainError('--val-dir and --train-dir must have the same class folders: --val-dir '
                         + '; '.join(x for x in (missing and f'lacks {", ".join(missing[:5])}',
                                                 extra and f'has {", ".join(extra[:5])} that --train-dir has not')
                                     if x) + f' ({len(val)} against {len(train_)} classes)')
    from .images import ImageError, ImageFiles, ood_set_names
    names = ood_set_names(cfg.ood_dirs)
    if len(set(names)) < len(names):
        raise TrainError(f'--ood-dirs {" ".join(cfg.ood_dirs)} name the same folder twice')
    for name, d in zip(names, cfg.ood_dirs):  # an OOD set has no classes: every image under the folder
        try:
            out[f'ood/{name}'] = ImageFiles(d, loader=_checked_loader)
        except ImageError as e:
            raise TrainError(f'--ood-dirs {e}')
    return out


def _protocol_or_error(cfg: TrainConfig, download: bool):
    from .protocols import DataMissing, load_protocol
    try:
        return load_protocol(cfg.data, cfg.data_root or None, download=download, split='train')
    except DataMissing as e:
        raise TrainError(str(e))


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP broadcasts them at the start of each
    training forward, so after the last step each rank holds its own batch's update; the checkpoint holds rank 0's,
    and the evaluation that measures it, sharded over the ranks, must score every image with them. Training is
    unchanged: its next forward broadcasts rank 0's buffers again."""
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def _evaluate(model, eval_sets, cfg, device, amp_dtype, rank, world) -> dict:
    """Every rank scores its slice of each set; rank 0 assembles them and computes the metrics."""
    outs = {}
    for name, ds in eval_sets.items():
        shard = Subset(ds, range(rank, len(ds), world))
        loader = DataLoader(shard, batch_size=max(1, cfg.batch_size // world), num_workers=cfg.workers)
        part = collect(model, loader, device, amp_dtype, cfg.channels_last,
                       progress=f'eval {name}' if cfg.progress and rank == 0 else None, spatial=name == 'val')
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, part)
            part = {k: torch.cat([p[k] for p in parts]) for k in part}
        outs[name] = part
    report = ssod_report(outs['val'], {k[4:]: v for k, v in outs.items() if k.startswith('ood/')})
    # a --ce-only run's OOD head is never trained: no ood_threshold for it
    report.update(thresholds_of(outs['val'], ood_head=not cfg.ce_only))
    return report


# flags a resumed run may change; every other one is the checkpoint's (its optimizer, scheduler and data order
# were made with them), so a resumed run uses, and records, the checkpoint's values
RESUME_MAY_CHANGE = ('epochs', 'resume', 'out_dir', 'workers', 'device', 'progress', 'eval_every', 'export_dir',
                     'best_acc_tolerance', 'compile', 'channels_last', 'train_dir', 'val_dir', 'ood_dirs', 'data_root',
                     'download', 'synthetic_root', 'deterministic')


def _resumed_config(cfg: TrainConfig) -> TrainConfig:
    """With ``--resume``: the checkpoint's settings for everything but :data:`RESUME_MAY_CHANGE`, and one
    warning listing the flags given with other values."""
    path = _resume_path(cfg, Path(cfg.out_dir))
    if path is None:
        return cfg
    try:
        old = torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('config') or {}
    except Exception:
        return cfg  # _load_resume reports an unreadable checkpoint
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    checked = ('model', 'data')  # another architecture or data set: _load_resume refuses it (model_kwargs: kept)
    kept = {k: v for k, v in old.items()
            if k in fields and k not in RESUME_MAY_CHANGE + checked and getattr(cfg, k) != v}
    if kept and int(os.environ.get('RANK', 0)) == 0:
        changes = ', '.join(f'--{k.replace("_", "-")} {v} (asked {getattr(cfg, k)})' for k, v in kept.items())
        print(f'warning: resuming {path} with its own settings: {changes}; the run uses and records these. '
              'Start a new --out-dir to train with other values', file=sys.stderr)
    return dataclasses.replace(cfg, **kept)


def _resume_path(cfg: TrainConfig, out_dir: Path) -> Optional[Path]:
    if cfg.resume == 'auto':
        return out_dir / 'last.pt' if (out_dir / 'last.pt').exists() else None
    if cfg.resume and not Path(cfg.resume).exists():
        raise TrainError(f'--resume {cfg.resume!r} does not exist')
    return Path(cfg.resume) if cfg.resume else None


def _load_resume(path: Path, cfg: TrainConfig, class_names: List[str], model: nn.Module) -> dict:
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise TrainError(f'cannot read checkpoint {path}: {e}')
    if not isinstance(ckpt, dict) or ckpt.get('format') != CHECKPOINT_FORMAT:
        raise TrainError(f'{path} is not an ssod_zoo training checkpoint')
    arch = model.pretrained_cfg['architecture']
    if ckpt['architecture'] != arch:
        raise TrainError(f'{path} was trained as {ckpt["architecture"]}, this run builds {arch}: '
                         f'resume with --model {ckpt["architecture"]}, or start a new --out-dir')
    if ckpt['class_names'] != class_names:
        raise TrainError(f'{path} was trained on {len(ckpt["class_names"])} classes, the data has '
                         f'{len(class_names)} (or other names): resume with the same data')
    model.load_state_dict(ckpt['model'])
    for k in THRESHOLDS:
        setattr(model, k, ckpt.get(k))  # spatial_threshold: None in checkpoints from before it existed
    return ckpt


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _progress(loader, enabled: bool, desc: str, start: int, total: int):
    if not enabled or not sys.stderr.isatty():  # piped to a file: no carriage-return bar, the epoch lines suffice
        return loader
    from tqdm.auto import tqdm
    return tqdm(loader, desc=desc, initial=start, total=total, dynamic_ncols=True, leave=False)


def _warn_small_map(model: nn.Module, cfg: TrainConfig, least: int = 9) -> None:
    """SSOD samples its ID and OOD patches among the positions of the feature map (Eq. 12): a map of a few
    positions has no background to sample, and the position readouts are the pooled ones."""
    size = tuple(model.pretrained_cfg['input_size'])
    was = model.training
    model.eval()  # no batch-norm statistics move
    with torch.no_grad():
        h, w = model.forward_features(torch.zeros(1, *size)).shape[-2:]
    if h * w < least:
        larger = _size_for_map(model, size, least)
        stride = -(-max(size[1:]) // max(h, w))
        finer = (' or with a finer map (--model-kwargs output_stride=16, as the shipped weights are)'
                 if stride > 16 and _takes(model, 'output_stride') else '')
        print(f'warning: at {size[1]}x{size[2]} px {cfg.model} gives a {h}x{w} feature map, and SSOD samples its ID '
              f'and OOD patches among its positions (Eq. 12): so few leave little or no background to sample, and '
              f'the position readouts equal the pooled ones. Train at a larger --img-size'
              f'{f" (at least {larger} for {least} positions)" if larger else ""}{finer}', file=sys.stderr)
    model.train(was)


def _size_for_map(model: nn.Module, size: tuple, least: int) -> Optional[int]:
    """The smallest square --img-size, in steps of 8 px up to 4x the given one, at which the model's feature map
    has ``least`` positions: found by running it on blank images (shapes only matter), not from a nominal stride."""
    with torch.no_grad():
        for side in range(max(size[1:]) + 8, 4 * max(size[1:]) + 1, 8):
            h, w = model.forward_features(torch.zeros(1, size[0], side, side)).shape[-2:]
            if h * w >= least:
                return side
    return None


def _takes(model: nn.Module, argument: str) -> bool:
    """Whether the timm architecture under ``model`` takes ``argument`` in its constructor."""
    import inspect
    timm_class = next((c for c in type(model).__mro__ if c.__module__.startswith('timm.models.')), None)
    return timm_class is not None and argument in inspect.signature(timm_class.__init__).parameters


def _warn_starved_sampler(train_log: dict, cfg: TrainConfig, num_classes: int, floor: float = 0.05) -> None:
    """One line when the sampler (Eq. 12) gives the OOD head almost nothing to learn from, and what to change."""
    from ..loss import ood_cutoff
    if train_log.get('frac_ood', 1.0) < floor:
        cut = ood_cutoff(cfg.gamma, num_classes, cfg.ood_rule)
        hint = (f'with {num_classes} classes a background patch rarely puts under {cut:.2f} on its own label; '
                f'try --ood-rule chance (OOD below max(1-gamma, 0.5/M) = {ood_cutoff(cfg.gamma, num_classes, "chance"):.2f})'
                if cfg.ood_rule == 'paper' and num_classes < 10 else 'try a lower --gamma')
        if cfg.exposure and 1 / num_classes >= cut:  # Outlier Exposure flattens its background out of the OOD set
            hint = (f'--exposure {cfg.exposure:g} flattens the class softmax of the background it trains on to about '
                    f'1/M = {1 / num_classes:.2f} on the label, above the cutoff of {cut:.2f}, so those patches '
                    f'leave the OOD set; lower --exposure or set it to 0 (the paper\'s objective); else {hint}')
        print(f'warning: only {train_log["frac_ood"]:.1%} of feature-map positions were sampled as OOD this epoch, '
              f'so the OOD head gets almost no background supervision: {hint}', file=sys.stderr)
    if train_log.get('frac_id', 1.0) < floor:
        print(f'warning: only {train_log["frac_id"]:.1%} of positions were sampled as ID this epoch (confidence >= '
              f'gamma {cfg.gamma} on the label): train the classifier longer first (--warmup-epochs) or lower --gamma',
              file=sys.stderr)


def _summary(record: dict) -> str:
    v, train = record['val'], record['train']
    # an epoch resumed after its last step from a checkpoint without its loss sums (written before they were
    # saved, or with other loss parts) trained nothing here: no loss to report
    line = f'epoch {record["epoch"]}: ' + (f'loss {train["loss"]:.3f}' if 'loss' in train else
                                           'resumed after its last step')
    if 'id_accuracy' in v:
        line += f', ID acc {v["id_accuracy"]:.2f}%'
    if 'ood_average' in v and record.get('ood_loss_on', True):  # --ce-only / warm-up: the OOD head is untrained
        a = v['ood_average']
        line += f', FPR95 {a["fpr95"]:.2f}%, AUROC {a["auroc"]:.2f}% (OOD factor, mean over {len(v["ood"])} sets)'
    return line + (f', {train["img_s"]:.0f} img/s' if 'img_s' in train else '')


def _cleanup(ddp: bool) -> None:
    if ddp and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
