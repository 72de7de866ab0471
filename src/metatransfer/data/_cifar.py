"""FC100 and CIFAR-FS from CIFAR-100: the canonical tar.gz, or a zip/folder of class folders.

Both benchmarks use all 600 images (train + test of CIFAR-100) of each fine class; they differ
only in how classes are split (`_cifar_splits`).
"""

from __future__ import annotations

import pickle
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from metatransfer.data._cifar_splits import CIFAR_FS_SPLIT, FC100_SPLIT, FINE_NAMES, FINE_TO_COARSE
from metatransfer.data._decode import RESAMPLE, ImageRef, is_image_name, open_zip
from metatransfer.data._sources import Built, ClassList, sha256_file, write_classes
from metatransfer.data.cache import SPLITS, CacheBuilder
from metatransfer.data.download import file_md5

__all__ = ["CIFAR100_ARCHIVE", "CIFAR100_MD5", "build_cifar", "split_classes"]

CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
IMAGES_PER_CLASS = 600
PROTOCOLS = {
    "fc100": "fc100 superclass split (TADAM, Oreshkin et al. 2018): 12/4/4 superclasses",
    "cifar-fs": "cifar-fs class split (Bertinetto et al. 2019)",
}


def split_classes(name: str) -> dict[str, list[str]]:
    """Fine class names per split, sorted, for "fc100" or "cifar-fs"."""
    if name == "fc100":
        return {
            split: sorted(f for f in FINE_NAMES if FINE_TO_COARSE[f] in FC100_SPLIT[split])
            for split in SPLITS
        }
    return {split: sorted(CIFAR_FS_SPLIT[split]) for split in SPLITS}


def _read_canonical(archive: Path) -> dict[str, np.ndarray]:
    """Fine name -> (600, 32, 32, 3) uint8 from the canonical pickled archive.

    The archive holds Python pickles, and unpickling runs code; so only the canonical file,
    identified by its published md5, is ever unpickled. `encoding="bytes"` because the pickles
    were written by Python 2.
    """
    digest = file_md5(archive)
    if digest != CIFAR100_MD5:
        raise ValueError(
            f"{archive} has md5 {digest}, not the canonical {CIFAR100_ARCHIVE} ({CIFAR100_MD5}); "
            f"it may be truncated or altered, and is not unpickled for safety. Download it again "
            f"(--download) or pass a zip/folder of class folders"
        )
    try:
        with tarfile.open(archive, "r:gz") as tar:
            parts = {}
            for member in ("meta", "train", "test"):
                handle = tar.extractfile(f"cifar-100-python/{member}")
                parts[member] = pickle.load(handle, encoding="bytes")
    except (tarfile.TarError, EOFError, OSError, KeyError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{archive} is damaged or truncated ({error}); download it again"
        ) from error
    names = [name.decode() for name in parts["meta"][b"fine_label_names"]]
    if names != list(FINE_NAMES):
        raise ValueError(f"{archive}: fine label names differ from CIFAR-100's; is this CIFAR-100?")
    data = np.concatenate([parts["train"][b"data"], parts["test"][b"data"]])
    labels = np.concatenate([parts["train"][b"fine_labels"], parts["test"][b"fine_labels"]])
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW -> (N, H, W, C)
    # Stable sort: within a class, the original train images come first, then the test ones.
    return {name: images[labels == index] for index, name in enumerate(names)}


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), RESAMPLE))


def _find_class_folders(source: Path) -> dict[str, list[ImageRef]]:
    """Images per fine class from `<class>/<img>` or `<top>/<class>/<img>`, in a zip or a folder."""
    found: dict[str, list[ImageRef]] = {}
    if source.is_file():
        with open_zip(source) as handle:
            members = [name for name in handle.namelist() if is_image_name(name)]
        for member in members:
            parts = member.split("/")
            if len(parts) in (2, 3) and parts[-2] in FINE_TO_COARSE:
                found.setdefault(parts[-2], []).append((str(source), member))
    else:
        for folder in [source, *sorted(p for p in source.iterdir() if p.is_dir())]:
            for name in FINE_NAMES:
                if (folder / name).is_dir() and name not in found:
                    files = sorted((folder / name).iterdir())
                    found[name] = [("", str(p)) for p in files if is_image_name(p.name)]
    for refs in found.values():
        refs.sort()
    return found


def build_cifar(
    builder: CacheBuilder,
    name: str,
    source: Path,
    *,
    image_size: int,
    log: Callable[[str], None],
) -> Built:
    if source.is_dir() and (source / CIFAR100_ARCHIVE).is_file():
        source = source / CIFAR100_ARCHIVE
    classes = split_classes(name)
    expected = {split: (len(names), IMAGES_PER_CLASS) for split, names in classes.items()}
    sha256 = sha256_file(source) if source.is_file() else None
    built = Built(source_path=source, sha256=sha256, protocol=PROTOCOLS[name], expected=expected)
    is_tar = source.name.endswith((".tar.gz", ".tgz")) or (
        source.is_file() and not zipfile.is_zipfile(source) and tarfile.is_tarfile(source)
    )
    if is_tar:
        arrays = _read_canonical(source)
        for split in SPLITS:
            names = classes[split]
            labels = np.repeat(
                np.arange(len(names), dtype=np.int64), [len(arrays[n]) for n in names]
            )
            images = builder.new_split(split, labels, names, (image_size, image_size, 3))
            stacked = np.concatenate([arrays[n] for n in names])
            if image_size != 32:
                stacked = np.stack([_resize(image, image_size) for image in stacked])
            images[:] = stacked
        return built
    found = _find_class_folders(source)
    missing = [n for n in FINE_NAMES if n not in found]
    if missing:
        raise FileNotFoundError(
            f"{source}: no folder of images for CIFAR-100 classes {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} missing); expected one "
            f"folder per fine class name, e.g. cifar100/apple/*.png"
        )
    for split in SPLITS:
        split_list: ClassList = [(n, found[n]) for n in classes[split]]
        write_classes(builder, split, split_list, mode="RGB", size=image_size)
    return built
