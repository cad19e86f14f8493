"""Named evaluation protocols on real data: the paper's tables, a Fashion-MNIST protocol that runs offline, and
OpenOOD v1.5's image lists.

    ssod eval  --protocol fashion-mnist --data-root /usr/share/datasets/fashion-mnist --model ssod_resnet18.fmnist
    ssod eval  --protocol cifar10  --data-root ~/data --download --model M --baseline-model B
    ssod eval  --protocol imagenet --data-root ~/data --model M
    ssod eval  --protocol cifar10  --openood-root ~/OpenOOD/data --model M     (OpenOOD's own splits)
    ssod train --data fashion-mnist --data-root /usr/share/datasets/fashion-mnist ...

A protocol gives un-transformed datasets that yield ``(PIL RGB image, int label)``: ``test`` (ID test),
``fit`` (ID training images, for the fitted baselines), ``ood`` ({name: dataset}) and ``skipped``
({name: one-line reason}) for OOD sets that are neither present nor downloadable; training also gets ``train``
and ``val`` (validation split carved from the training data, never the test split). A required data set that is
missing raises :class:`DataMissing` with one line: the data set, the path where it was expected, how to get it.

Protocols (ID | OOD):
    fashion-mnist  6 Fashion-MNIST classes (T-shirt/top, Trouser, Pullover, Dress, Sneaker, Bag) | near-OOD: the
                   4 held-out classes' test images (Coat, Sandal, Shirt, Ankle boot: each has a look-alike ID class);
                   far-OOD: ``noise`` (:class:`SyntheticFar`: blank frames and four kinds of noise, made
                   here, other draws for validation and test), and the MNIST and KMNIST test sets when present
                   under ROOT (or with --download).
    cifar10        CIFAR-10 test | SVHN, LSUN, iSUN, Textures (DTD), Places365 (paper Table 2; each subsampled to
                   at most 10,000 images, Appendix A.3).
    imagenet       ImageNet val | iNaturalist, SUN, Places, Textures: the MOS/KNN-paper subsets as folders (Table 1).
    openood        ``--openood-root`` with OpenOOD v1.5's ``benchmark_imglist/<cifar10|imagenet>/test_*.txt``.
"""
import gzip
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset, Subset

from .images import list_images, read_image

__all__ = ['PROTOCOLS', 'DataMissing', 'ProtocolData', 'load_protocol', 'Transformed',
           'FMNIST_CLASSES', 'FMNIST_ID', 'FMNIST_OOD', 'SyntheticFar', 'FAR_KINDS']

PROTOCOLS = ('fashion-mnist', 'cifar10', 'imagenet')
OOD_LIMIT = 10_000  # paper Appendix A.3: at most 10,000 images per OOD set


class DataMissing(Exception):
    """A required data set is absent: the message is one line (data set, expected path, how to get it)."""


@dataclass
class ProtocolData:
    name: str
    classes: List[str]
    test: Dataset
    fit: Optional[Dataset] = None
    train: Optional[Dataset] = None
    val: Optional[Dataset] = None
    ood: Dict[str, Dataset] = field(default_factory=dict)
    ood_val: Dict[str, Dataset] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    groups: Dict[str, List[str]] = field(default_factory=dict)  # e.g. OpenOOD's {'near': [...], 'far': [...]}


class Transformed(Dataset):
    """Applies ``transform`` to the image of ``(image, label)`` pairs."""

    def __init__(self, dataset: Dataset, transform: Optional[Callable]):
        self.dataset, self.transform = dataset, transform
        self.classes = getattr(dataset, 'classes', None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return (self.transform(image) if self.transform else image), label


class _Classes(Dataset):
    """Rows ``indices`` of ``dataset`` as RGB images, labels mapped by ``label_map`` (-1 for OOD)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], label_map: Dict[int, int], classes: List[str]):
        self.dataset, self.indices, self.label_map, self.classes = dataset, list(indices), label_map, classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return image.convert('RGB'), self.label_map.get(int(label), -1)

    @property
    def targets(self) -> List[int]:
        """The mapped labels, without reading an image (AttributeError when the dataset has no ``targets``)."""
        inner = self.dataset.targets
        return [self.label_map.get(int(inner[i]), -1) for i in self.indices]


def limited(ds: Dataset, limit: int, targets: Optional[Sequence[int]] = None) -> Dataset:
    """At most ``limit`` images of ``ds`` (0: all), drawn at random with seed 0, the same on every machine. With
    ``targets``, class by class in turn, so every class gets ``limit // M`` images or one more (or all it has):
    KNN, Mahalanobis and ViM fit per class."""
    if limit <= 0 or len(ds) <= limit:
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    if targets is not None and len(targets):
        labels = torch.as_tensor(targets)[order]
        rank = torch.empty_like(labels)  # an image's place among its class's images in the random order
        for c in labels.unique():
            members = labels == c
            rank[members] = torch.arange(int(members.sum()))
        order = order[torch.sort(rank, stable=True).indices]
    return Subset(ds, order[:limit].tolist())


# --------------------------------------------------------------------------------------------- Fashion-MNIST
FMNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                  'Ankle boot']
FMNIST_ID = (0, 1, 2, 3, 7, 8)  # T-shirt/top, Trouser, Pullover, Dress, Sneaker, Bag
FMNIST_OOD = (4, 5, 6, 9)  # Coat~Pullover, Sandal~Sneaker, Shirt~T-shirt, Ankle boot~Sneaker: near-OOD
FMNIST_VAL_PER_CLASS = 100  # from the training split: validation chooses, the test split reports
_IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
              't10k-labels-idx1-ubyte')
DEBIAN_FMNIST = Path('/usr/share/datasets/fashion-mnist')  # Debian's dataset-fashion-mnist


def _get_fmnist() -> str:
    """What to do when Fashion-MNIST is not under the data root: point at Debian's copy where it is installed."""
    if (DEBIAN_FMNIST / 'train-images-idx3-ubyte.gz').is_file():
        return f'Debian\'s dataset-fashion-mnist is installed: pass --data-root {DEBIAN_FMNIST}'
    return f'apt-get install dataset-fashion-mnist (files in {DEBIAN_FMNIST}) or add --download'


def default_cache() -> Path:
    return Path(os.environ.get('SSOD_ZOO_CACHE', Path.home() / '.cache' / 'ssod_zoo'))


def _mnist_root(cls_name: str, root: Path, cache: Path, download: bool, how: str, flat: bool = False) -> Path:
    """A root that torchvision's ``cls_name`` (MNIST layout) reads: ROOT itself when ROOT/<cls>/raw holds the
    uncompressed IDX files, else a cache with them decompressed from ROOT/<cls>/raw/*.gz or, with ``flat``,
    ROOT/*.gz (Debian's dataset-fashion-mnist ships them gzipped there; torchvision reads them uncompressed)."""
    raw = root / cls_name / 'raw'
    if all((raw / f).is_file() for f in _IDX_FILES):
        return root
    for src in ((root, raw) if flat else (raw,)):
        if all((src / (f + '.gz')).is_file() for f in _IDX_FILES):
            dst = cache / cls_name / 'raw'
            dst.mkdir(parents=True, exist_ok=True)
            for f in _IDX_FILES:
                gz = src / (f + '.gz')
                out = dst / f
                if out.is_file() and out.stat().st_mtime >= gz.stat().st_mtime:
                    continue
                tmp = out.with_name(out.name + f'.{os.getpid()}.tmp')
                with gzip.open(gz, 'rb') as fi, open(tmp, 'wb') as fo:
                    shutil.copyfileobj(fi, fo)
                os.replace(tmp, out)  # atomic: a concurrent reader never sees half a file
            return cache
    if download:
        import torchvision.datasets as tvd
        getattr(tvd, cls_name)(str(root), train=True, download=True)
        getattr(tvd, cls_name)(str(root), train=False, download=True)
        return root
    where = f'{root} or {raw}' if flat else str(raw)
    raise DataMissing(f'{cls_name}: no {_IDX_FILES[0]}[.gz] in {where}; {how}')


def _mnist_split(cls_name: str, root: Path, cache: Path, download: bool, how: str, train: bool):
    import torchvision.datasets as tvd
    flat = cls_name == 'FashionMNIST'
    return getattr(tvd, cls_name)(str(_mnist_root(cls_name, root, cache, download, how, flat)), train=train)


def _by_class(targets: torch.Tensor, classes: Sequence[int]) -> List[int]:
    keep = torch.isin(targets, torch.tensor(classes))
    return keep.nonzero().flatten().tolist()


FAR_KINDS = ('constant', 'uniform', 'gaussian', 'rademacher', 'blobs')
FAR_VERSION = 1  # bump when an image of SyntheticFar changes; the seeds below then name other images
FAR_SEEDS = {'val': 0, 'test': 1}
FAR_PER_KIND = {'val': 100, 'test': 200}


class SyntheticFar(Dataset):
    """Far-OOD images made of noise, ``per_kind`` of each of :data:`FAR_KINDS`, grey ``size`` x ``size`` as RGB:
    what a deployed classifier meets when the input is no photograph at all. Three kinds are the synthetic OOD sets
    of Outlier Exposure (Hendrycks et al., 2019): ``gaussian`` N(0.5, 0.25) clipped to [0, 1], ``rademacher``
    pixels 0 or 1, and ``blobs`` (Bernoulli(0.7) pixels blurred with sigma 1.5, below 0.75 set to 0: shapes with
    sharp edges); ``uniform`` is ODIN's (Liang et al., 2018) uniform noise; ``constant`` is a blank frame at a
    random grey level (a covered lens, a dead feed). Image ``i`` depends on ``seed`` and ``i`` only, the same on
    every machine (:data:`FAR_VERSION`)."""

    def __init__(self, per_kind: int, seed: int, size: int = 28):
        self.per_kind, self.seed, self.size = per_kind, seed, size

    def __len__(self) -> int:
        return self.per_kind * len(FAR_KINDS)

    @property
    def targets(self) -> List[int]:
        return [-1] * len(self)

    def kind(self, index: int) -> str:
        return FAR_KINDS[index // self.per_kind]

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision.transforms.functional import gaussian_blur
        if not 0 <= index < len(self):
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        shape, kind = (1, self.size, self.size), self.kind(index)
        if kind == 'constant':
            x = torch.rand(1, generator=g).expand(shape)
        elif kind == 'uniform':
            x = torch.rand(shape, generator=g)
        elif kind == 'gaussian':
            x = (0.5 + 0.25 * torch.randn(shape, generator=g)).clamp(0, 1)
        elif kind == 'rademacher':
            x = torch.bernoulli(torch.full(shape, 0.5), generator=g)
        else:  # blobs
            x = gaussian_blur(torch.bernoulli(torch.full(shape, 0.7), generator=g), kernel_size=11, sigma=1.5)
            x = torch.where(x < 0.75, 0.0, x)
        grey = (x[0] * 255).round().to(torch.uint8).numpy()
        return Image.fromarray(grey, mode='L').convert('RGB'), -1


def fashion_mnist(root: Path, download: bool = False, cache: Optional[Path] = None) -> ProtocolData:
    cache = cache or default_cache() / 'fashion-mnist'
    remedy = _get_fmnist()
    train = _mnist_split('FashionMNIST', root, cache, download, remedy, True)
    test = _mnist_split('FashionMNIST', root, cache, download, remedy, False)
    id_map = {c: i for i, c in enumerate(FMNIST_ID)}
    classes = [FMNIST_CLASSES[c] for c in FMNIST_ID]
    # validation: the first FMNIST_VAL_PER_CLASS training images of each class (ID and held-out), never trained on
    val_idx, ood_val_idx, train_idx = [], [], []
    for c in range(10):
        rows = (train.targets == c).nonzero().flatten().tolist()
        (val_idx if c in id_map else ood_val_idx).extend(rows[:FMNIST_VAL_PER_CLASS])
        if c in id_map:
            train_idx.extend(rows[FMNIST_VAL_PER_CLASS:])
    train_idx.sort()
    data = ProtocolData(
        name='fashion-mnist', classes=classes,
        test=_Classes(test, _by_class(test.targets, FMNIST_ID), id_map, classes),
        fit=_Classes(train, train_idx, id_map, classes),
        train=_Classes(train, train_idx, id_map, classes),
        val=_Classes(train, sorted(val_idx), id_map, classes),
        ood={'fmnist_heldout': _Classes(test, _by_class(test.targets, FMNIST_OOD), {}, classes),
             'noise': SyntheticFar(FAR_PER_KIND['test'], FAR_SEEDS['test'])},
        ood_val={'fmnist_heldout': _Classes(train, sorted(ood_val_idx), {}, classes),
                 'noise': SyntheticFar(FAR_PER_KIND['val'], FAR_SEEDS['val'])},
    )
    for name, cls_name in (('mnist', 'MNIST'), ('kmnist', 'KMNIST')):
        how = f'torchvision.datasets.{cls_name} layout ({cls_name}/raw/) under --data-root, or add --download'
        try:
            ds = _mnist_split(cls_name, root, cache.parent / name, download, how, False)
        except DataMissing as e:
            data.skipped[name] = str(e)
        except Exception as e:  # a failed download (offline): skipped, with the reason
            data.skipped[name] = f'{cls_name}: {type(e).__name__}: {e}'.splitlines()[0]
        else:
            data.ood[name] = _Classes(ds, range(len(ds)), {}, classes)
    return data


# ----------------------------------------------------------------------------------------- image folders

class ImageList(Dataset):
    """Image files with labels: every image under ``root`` (any depth, sorted; label -1, an OOD set needs no class
    folders) or an explicit list (an OpenOOD image list). Reads with :func:`ssod_zoo.app.images.read_image`, so a
    corrupt file is an ``ImageError`` naming it.

    Attributes:
        paths: the image files; ``dataset[i]`` is ``(image_i, labels[i])``.
    """

    def __init__(self, root: Path, paths: Optional[List[Path]] = None, labels: Optional[List[int]] = None):
        self.root = Path(root)
        self.paths = paths if paths is not None else list_images(self.root)
        self.labels = labels if labels is not None else [-1] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return read_image(self.paths[index]), self.labels[index]

    @property
    def targets(self) -> List[int]:  # the name torchvision's data sets use, which evaluation reads
        return self.labels


def _ood_folder(root: Path, name: str, how: str) -> Dataset:
    folder = root / name
    ds = ImageList(folder) if folder.is_dir() else None
    if ds is None or len(ds) == 0:
        raise DataMissing(f'{name}: no images in {folder}; {how}')
    return ds


def _class_folder(path: Path, what: str, how: str) -> Dataset:
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(str(path), loader=read_image)
    except (FileNotFoundError, OSError):
        raise DataMissing(f'{what}: no class sub-folders of images in {path}; {how}') from None


def _torchvision(what: str, make: Callable[[bool], Dataset], where: Path, download: bool, how: str) -> Dataset:
    """A torchvision data set, or DataMissing naming where it was expected (and --download if it applies)."""
    try:
        return make(download)
    except RuntimeError as e:
        if 'not found' not in str(e).lower() and 'download=True' not in str(e):
            raise
        raise DataMissing(f'{what}: not found in {where}; {how}') from None
    except OSError as e:  # a download that failed (offline, server down)
        raise DataMissing(f'{what}: not in {where} and the download failed ({type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""}); {how}') from None


def _optional(data: ProtocolData, name: str, make: Callable[[], Dataset], limit: int = 0) -> None:
    """Adds OOD set ``name``; a missing one is listed in ``data.skipped`` with the reason instead."""
    try:
        data.ood[name] = limited(make(), limit)
    except DataMissing as e:
        data.skipped[name] = str(e)


def _split_off(ds: Dataset, n: int, seed: int = 0):
    """(train, val): a fixed random ``n`` items of ``ds`` become the validation split."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    train, val = Subset(ds, sorted(perm[n:])), Subset(ds, sorted(perm[:n]))
    train.classes = val.classes = getattr(ds, 'classes', None)
    return train, val


# ---------------------------------------------------------------------------------------------- CIFAR-10
_ODIN = 'download it from https://github.com/facebookresearch/odin (Out-of-distribution datasets) and unpack it there'


def cifar10(root: Path, download: bool = False, train: bool = False) -> ProtocolData:
    """Paper Table 2: ID CIFAR-10 test; OOD SVHN, LSUN, iSUN, Textures, Places365, at most 10,000 each (A.3)."""
    import torchvision.datasets as tvd
    dl = 'add --download (torchvision fetches it)'
    test = _torchvision('CIFAR-10', lambda d: tvd.CIFAR10(str(root), train=False, download=d),
                        root / 'cifar-10-batches-py', download, dl)
    fit = _torchvision('CIFAR-10', lambda d: tvd.CIFAR10(str(root), train=True, download=d),
                       root / 'cifar-10-batches-py', download, dl)
    data = ProtocolData(name='cifar10', classes=list(test.classes), test=test, fit=fit)
    if train:
        data.train, data.val = _split_off(fit, 5000)
        try:  # Textures' val split chooses; its test split reports
            data.ood_val['textures_val'] = tvd.DTD(str(root), split='val', download=download)
        except (RuntimeError, OSError):
            pass
    _optional(data, 'svhn', lambda: _torchvision('SVHN', lambda d: tvd.SVHN(str(root / 'svhn'), 'test', download=d),
                                                 root / 'svhn' / 'test_32x32.mat', download, dl), OOD_LIMIT)
    _optional(data, 'lsun', lambda: _ood_folder(root, 'LSUN', _ODIN), OOD_LIMIT)
    _optional(data, 'isun', lambda: _ood_folder(root, 'iSUN', _ODIN), OOD_LIMIT)
    _optional(data, 'textures', lambda: _torchvision('Textures (DTD)', lambda d: tvd.DTD(str(root), 'test', download=d),
                                                     root / 'dtd', download, dl), OOD_LIMIT)
    _optional(data, 'places365', lambda: _torchvision(
        'Places365', lambda d: tvd.Places365(str(root / 'places365'), 'val', small=True, download=d),
        root / 'places365' / 'val_256', download, dl + ': the small val split, 2.1 GB'), OOD_LIMIT)
    if not data.ood:
        raise DataMissing('cifar10: none of its OOD sets is under ' + str(root) + ': ' +
                          ' | '.join(data.skipped.values()))
    return data


# ---------------------------------------------------------------------------------------------- ImageNet
_MOS = ('get the MOS subset from https://github.com/deeplearning-wisc/large_scale_ood#out-of-distribution-dataset '
        'and unpack it there')


def imagenet(root: Path, download: bool = False, train: bool = False) -> ProtocolData:
    """Paper Table 1: ID ImageNet-1k val; OOD iNaturalist, SUN, Places, Textures (the MOS/KNN-paper subsets)."""
    how = ('ImageNet cannot be downloaded automatically: get ILSVRC2012 from https://image-net.org and put the val '
           'images in one sub-folder per class (e.g. with valprep.sh)')
    test = _class_folder(root / 'imagenet' / 'val', 'ImageNet val', how)
    data = ProtocolData(name='imagenet', classes=list(test.classes), test=test)
    try:
        data.fit = _class_folder(root / 'imagenet' / 'train', 'ImageNet train', how.replace('val', 'train'))
    except DataMissing as e:
        if train:
            raise
        data.skipped['fit'] = f'{e} (KNN, Mahalanobis, ViM and ReAct are left out)'
    if train:
        data.train, data.val = _split_off(data.fit, 10_000)  # 10,000 at random (seeded): validation never touches val
    for name in ('iNaturalist', 'SUN', 'Places', 'Textures'):
        _optional(data, name.lower(), lambda name=name: _ood_folder(root, name, _MOS))
    if not data.ood and not train:
        raise DataMissing('imagenet: none of its OOD sets is under ' + str(root) + ': ' +
                          ' | '.join(data.skipped.values()))
    return data


# ---------------------------------------------------------------------------------------------- OpenOOD v1.5
# OpenOOD v1.5's evaluation_api/datasets.py: image list, images folder; near- and far-OOD groups
OPENOOD = {
    'cifar10': {
        'images': 'images_classic',
        'id': {'train': 'train_cifar10.txt', 'val': 'val_cifar10.txt', 'test': 'test_cifar10.txt'},
        'ood_val': {'cifar100_val': 'val_cifar100.txt'},
        'near': {'cifar100': 'test_cifar100.txt', 'tin': 'test_tin.txt'},
        'far': {'mnist': 'test_mnist.txt', 'svhn': 'test_svhn.txt', 'texture': 'test_texture.txt',
                'places365': 'test_places365.txt'},
        'classes': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'],
    },
    'imagenet': {
        'images': 'images_largescale',
        'id': {'train': 'train_imagenet.txt', 'val': 'val_imagenet.txt', 'test': 'test_imagenet.txt'},
        'ood_val': {'openimage_o_val': 'val_openimage_o.txt'},
        'near': {'ssb_hard': 'test_ssb_hard.txt', 'ninco': 'test_ninco.txt'},
        'far': {'inaturalist': 'test_inaturalist.txt', 'textures': 'test_textures.txt',
                'openimage_o': 'test_openimage_o.txt'},
        'classes': [str(i) for i in range(1000)],
        'images_of': {'textures': 'images_classic'},  # OpenOOD keeps Textures with the classic images
    },
}
_GET_OPENOOD = ("get OpenOOD v1.5's data with its scripts/download/download.py --contents datasets --datasets "
                'ood_v1.5 and pass its data/ folder as --openood-root')


def read_imglist(root: Path, imglist: str, images: str) -> ImageList:
    """An OpenOOD ``benchmark_imglist`` file: one ``<path relative to root/images> <label or json>`` per line."""
    import json
    files, labels = [], []
    for line in Path(imglist).read_text().splitlines():
        if not line.strip():
            continue
        path, _, extra = line.strip().partition(' ')
        files.append(root / images / path)
        extra = extra.strip()
        try:
            label = int(json.loads(extra)['label']) if extra.startswith('{') else int(extra)
        except (ValueError, KeyError, TypeError):
            label = -1
        labels.append(label)
    return ImageList(root / images, files, labels)


def openood(name: str, root: Path) -> ProtocolData:
    """OpenOOD v1.5's splits of benchmark ``name`` (cifar10 or imagenet) from its ``data/`` folder ``root``."""
    if name not in OPENOOD:
        raise DataMissing(f'OpenOOD: no {name!r} benchmark here; --openood-root takes --protocol '
                          f'{" or ".join(OPENOOD)}')
    spec = OPENOOD[name]
    lists = root / 'benchmark_imglist' / name

    def load(key: str, file: str) -> ImageList:
        images = spec.get('images_of', {}).get(key, spec['images'])
        path = lists / file
        if not path.is_file():
            raise DataMissing(f'OpenOOD {name} {key}: no image list {path}; {_GET_OPENOOD}')
        ds = read_imglist(root, path, images)
        if len(ds) == 0 or not ds.paths[0].is_file():
            first = ds.paths[0] if len(ds) else root / images
            raise DataMissing(f'OpenOOD {name} {key}: {path.name} lists images that are not there (e.g. {first}); '
                              f'{_GET_OPENOOD}')
        ds.classes = spec['classes']
        return ds

    data = ProtocolData(name=f'openood-{name}', classes=spec['classes'], test=load('test', spec['id']['test']))
    for key, attr in (('train', 'fit'), ('val', 'val')):
        try:
            setattr(data, attr, load(key, spec['id'][key]))
        except DataMissing as e:
            data.skipped[key] = str(e)
    data.train = data.fit
    for key, file in spec['ood_val'].items():
        try:
            data.ood_val[key] = load(key, file)
        except DataMissing:
            pass
    for group in ('near', 'far'):
        data.groups[group] = []
        for key, file in spec[group].items():
            try:
                data.ood[key] = load(key, file)
                data.groups[group].append(key)
            except DataMissing as e:
                data.skipped[key] = str(e)
    if not data.ood:
        raise DataMissing(f'OpenOOD {name}: none of its OOD image lists is usable under {lists}; {_GET_OPENOOD}')
    return data


# ------------------------------------------------------------------------------ both FPR95 conventions
def add_fpr95_openood(results: dict) -> dict:
    """Adds ``fpr95_openood`` (OpenOOD's OOD-positive FPR95, percent) next to every ``fpr95`` in ``results``
    (the output of :func:`ssod_zoo.app.evaluate.evaluate`, which keeps the raw scores), and to the average."""
    from ..metrics import fpr95_ood_positive
    sets = [s for s in results['ood'] if s != 'average']
    for method, by_set in results['scores'].items():
        for s in sets:
            if method in results['ood'][s]:
                results['ood'][s][method]['fpr95_openood'] = 100 * fpr95_ood_positive(by_set['id'], by_set[s])
        if method in results['ood'].get('average', {}) and sets:
            results['ood']['average'][method]['fpr95_openood'] = sum(
                results['ood'][s][method]['fpr95_openood'] for s in sets) / len(sets)
    return results


def fpr95_markdown(results: dict) -> str:
    """FPR95 in both conventions, side by side: the paper's (ID positive) and OpenOOD's (OOD positive)."""
    from .report import baseline_of, method_label
    sets = [s for s in results['ood'] if s != 'average'] + ['average']
    methods = list(results['ood']['average'])
    head = '| Method | ' + ' | '.join(f'{s} FPR95 paper↓ | {s} FPR95 OpenOOD↓' for s in sets) + ' |'
    rows = [head, '|---|' + '---:|---:|' * len(sets)]
    for m in methods:
        cells = [f'{results["ood"][s][m]["fpr95"]:.2f} | {results["ood"][s][m].get("fpr95_openood", float("nan")):.2f}'
                 for s in sets]
        rows.append(f'| {method_label(m, baseline_of(results["id_accuracy"]))} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(['FPR95, both conventions. Paper (ID positive): OOD images accepted when 95% of ID images are '
                      'accepted. OpenOOD v1.5 (OOD positive): ID images rejected when 95% of OOD images are rejected.',
                      '', *rows])


def skipped_markdown(skipped: Dict[str, str]) -> str:
    return '\n'.join(['Skipped (not present and not downloadable):', ''] + [f'- {k}: {v}' for k, v in skipped.items()])


# ------------------------------------------------------------------------------------------------ dispatcher
def load_protocol(name: str, root: Optional[str] = None, download: bool = False, split: str = 'test',
                  openood_root: Optional[str] = None, cache: Optional[Path] = None) -> ProtocolData:
    """The data of protocol ``name`` (see the module docstring). ``split='train'`` also builds ``train``/``val``.

    Raises:
        DataMissing: a required data set is neither under ``root`` nor downloadable (one-line message).
    """
    if name not in PROTOCOLS:
        raise ValueError(f'unknown protocol {name!r}; one of: {", ".join(PROTOCOLS)}')
    if openood_root:
        return openood(name, Path(openood_root).expanduser())
    root_path = Path(root or os.environ.get('SSOD_ZOO_DATA', 'data')).expanduser()
    if name == 'fashion-mnist':
        return fashion_mnist(root_path, download=download, cache=cache)
    return {'cifar10': cifar10, 'imagenet': imagenet}[name](root_path, download=download, train=split == 'train')
