"""Image folders as users have them: class sub-folders for ID data, any tree of images for OOD data.

An OOD set has no classes, so :class:`ImageFiles` takes every image under a folder, however deep (a flat folder,
or the ``<set>/<dummy class>/`` layout ImageFolder needs), with target -1. Both datasets read images with
:func:`read_image`, which turns a corrupt file into :class:`ImageError` naming it, and :func:`one_line` gets that
line back out of a DataLoader worker's wrapped traceback. :func:`unreadable_report` names every unreadable file of
a run's folders at once, after the first one stopped it.
"""
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

__all__ = ['IMAGE_EXTENSIONS', 'ImageError', 'ImageFiles', 'class_folder', 'class_key', 'list_images', 'one_line',
           'read_image', 'to_rgb', 'unreadable', 'unreadable_report']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class ImageError(ValueError):
    """An image file that cannot be read, or a folder without images; the message names it."""


def to_rgb(image):
    """A PIL image as 8-bit RGB. A 16-bit grey image (``I;16``, as PIL opens 16-bit PNGs) is scaled onto 0-255;
    PIL's own ``convert('RGB')`` clips it there, so every pixel above 255 of 65535 became white."""
    if image.mode.startswith('I;16'):
        import numpy as np
        from PIL import Image
        grey = np.asarray(image, dtype=np.float32) / 257.0  # 65535 -> 255
        image = Image.fromarray(grey.round().astype(np.uint8), mode='L')
    return image.convert('RGB')


def read_image(path):
    """The image at ``path`` as RGB (:func:`to_rgb`); :class:`ImageError` naming the file if it is not a readable
    image."""
    from PIL import Image
    try:
        with open(path, 'rb') as f:
            return to_rgb(Image.open(f))
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise ImageError(f'cannot read image {path}: {type(e).__name__}: {e}') from None


def unreadable(files: Iterable, decode: bool = True) -> Iterator[Tuple[Path, str]]:
    """``(path, why)`` for each of ``files`` PIL cannot open (a header check, fast), or with ``decode`` cannot
    decode: a file cut short passes the header check (and PIL's ``verify()`` too, for a JPEG)."""
    from PIL import Image
    for path in files:
        try:
            with Image.open(path) as im:
                if decode:
                    im.load()
        except Exception as e:  # the formats' parsers raise what they raise
            yield Path(path), f'{type(e).__name__}: {e}'


def unreadable_report(files: Sequence, shown: int = 3) -> Optional[str]:
    """One line naming how many of ``files`` cannot be read (:func:`unreadable`, each decoded: as long as reading
    them all) and the first ``shown`` of them, so a large folder is reported in one go rather than one crash at a
    time; None when every file reads."""
    bad = list(unreadable(files))
    if not bad:
        return None
    (first, why), rest = bad[0], [str(p) for p, _ in bad[1:shown]]
    more = f' and {len(bad) - shown} more' if len(bad) > shown else ''
    return (f'{len(bad)} of {len(files)} images cannot be read: cannot read image {first} ({why})'
            f'{"; also " + ", ".join(rest) if rest else ""}{more}. Fix or delete them and run again')


def list_images(folder, warn_skipped: bool = False) -> List[Path]:
    """Every image file under ``folder`` (recursively), sorted: files with an :data:`IMAGE_EXTENSIONS` suffix, as
    torchvision's ImageFolder takes them. ``warn_skipped``: one warning naming the other files (hidden ones aside),
    which a user may have expected to be read."""
    files = [p for p in Path(folder).rglob('*') if p.is_file()]
    images = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
    if warn_skipped:
        other = sorted(p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS and not p.name.startswith('.'))
        if other:
            examples = ', '.join(p.name for p in other[:3]) + (', ...' if len(other) > 3 else '')
            warnings.warn(f'{folder}: skipped {len(other)} file{"s" * (len(other) > 1)} without one of the suffixes '
                          f'read in folders ({examples}): {", ".join(IMAGE_EXTENSIONS)} (torchvision ImageFolder\'s; '
                          'a file named on its own is read whatever its suffix)', stacklevel=2)
    return images


class ImageFiles(Dataset):
    """Every image under a folder, with target -1 (no class): an OOD set, flat or nested.

    Attributes:
        paths: the image files, sorted; ``dataset[i]`` is ``(transform(image_i), -1)``.
    """

    def __init__(self, folder, transform: Optional[Callable] = None, loader: Callable = read_image):
        if not Path(folder).is_dir():
            raise ImageError(f'{folder} is not a directory')
        self.paths = list_images(folder, warn_skipped=True)
        if not self.paths:
            raise ImageError(f'{folder} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
        self.transform, self.loader = transform, loader
        self.classes: List[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.loader(self.paths[i])
        return (self.transform(image) if self.transform else image), -1


def class_folder(folder, transform: Optional[Callable] = None):
    """torchvision's ImageFolder (one sub-folder per class) reading with :func:`read_image`, or ImageError."""
    from torchvision.datasets import ImageFolder
    if not Path(folder).is_dir():
        raise ImageError(f'{folder} is not a directory')
    try:
        return ImageFolder(str(folder), transform=transform, loader=read_image)
    except FileNotFoundError as e:
        raise ImageError(f'{folder}: {e} (expected one sub-folder of images per class)') from None


def class_key(name: str) -> str:
    """A class name up to case and the characters a folder name may not hold: 'T-shirt_top' is 'T-shirt/top'."""
    return re.sub(r'[\W_]', '', str(name).casefold())


def one_line(error: BaseException) -> str:
    """The message of an error, without the traceback a DataLoader worker wraps around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    # the worker's re-raised line names the error class, with its module path when it is not a builtin
    for name in (type(error).__name__, 'ImageError'):
        match = re.match(rf'(?:[\w.]+\.)?{name}: ', last)
        if len(lines) > 1 and match:
            return last[match.end():]
    return last if len(lines) > 1 and 'Traceback' in str(error) else lines[0]


# names the reports use for themselves: an OOD folder is never called one of them
RESERVED_SET_NAMES = ('id', 'val', 'average')


def ood_set_names(dirs: Sequence[str]) -> List[str]:
    """A name per OOD folder for tables, logs and records: its own name, or as many of its last path parts as tell
    it apart from the others (``ds1/val`` and ``ds2/val``) and from the names the reports use (``edge/id``). The same
    folder given twice gets the same name: callers refuse it."""
    parts = [Path(d).resolve().parts for d in dirs]
    names = []
    for p in parts:
        k = 1
        while k < len(p) and (sum(q[-k:] == p[-k:] for q in parts) > 1 or '/'.join(p[-k:]) in RESERVED_SET_NAMES):
            k += 1
        names.append('/'.join(p[-k:]))
    return names
