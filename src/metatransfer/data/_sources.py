"""Plumbing shared by the dataset readers: class lists, split checks, folder listings.

A reader turns a source into, per split, a list of `(class_name, image_refs)`; `write_classes`
then decodes those images straight into the cache's memory-mapped arrays, so even
tieredImageNet never has to fit in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metatransfer.data._decode import ImageRef, decode_into, is_image_name
from metatransfer.data.cache import SPLITS, CacheBuilder

__all__ = [
    "Built",
    "ClassList",
    "sha256_file",
    "content_digest",
    "list_images",
    "check_disjoint",
    "check_min_images",
    "write_classes",
]

ClassList = list[tuple[str, list[ImageRef]]]


@dataclass
class Built:
    """What a reader reports about the source it wrote, for the manifest and the count check."""

    source_path: Path
    sha256: str | None
    protocol: str
    # split -> (number of classes, images per class or None when it varies); None: no benchmark
    expected: dict[str, tuple[int, int | None]] | None
    files: dict[str, str] | None = None
    content_digest: str | None = None  # a folder source's images, named by their pixels


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def content_digest(classes: dict[str, ClassList]) -> str:
    """One checksum for a copy's images: sha256 over the sorted `name sha256` lines of its files.

    It names the pixels, not the layout, so two copies that hold the same files in other folders
    agree, and two copies that hold other images under the same names (miniImageNet's do) differ.
    """
    lines = sorted(
        f"{Path(member).name} {sha256_file(member)}\n"
        for split_classes in classes.values()
        for _, refs in split_classes
        for _, member in refs
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def list_images(folder: Path) -> list[str]:
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(
        str(path) for path in folder.iterdir() if path.is_file() and is_image_name(path.name)
    )


def check_disjoint(class_names: dict[str, list[str]], where: str) -> None:
    """Few-shot splits must not share classes; name the shared ones."""
    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1 :]:
            shared = sorted(set(class_names[first]) & set(class_names[second]))
            if shared:
                listed = ", ".join(shared[:10]) + (" ..." if len(shared) > 10 else "")
                raise ValueError(
                    f"{where}: splits {first!r} and {second!r} share {len(shared)} classes "
                    f"({listed}); each class must be in one split only: fix the split files"
                )
    for split in SPLITS:
        names = class_names[split]
        if len(set(names)) != len(names):
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(
                f"{where}: split {split!r} lists classes twice: {', '.join(repeated[:10])}"
            )


def check_min_images(classes: ClassList, minimum: int, where: str) -> None:
    for class_name, refs in classes:
        if len(refs) < minimum:
            raise ValueError(
                f"{where}: class {class_name!r} has {len(refs)} image(s), at least {minimum} are "
                f"needed; add images or remove the class"
            )


def write_classes(
    builder: CacheBuilder,
    split: str,
    classes: ClassList,
    *,
    mode: str,
    size: int,
    invert: bool = False,
) -> None:
    """Decode every class's images, in class order, into the split's arrays."""
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(refs) for _, refs in classes])
    channels = 1 if mode == "L" else 3
    images = builder.new_split(split, labels, [name for name, _ in classes], (size, size, channels))
    refs = [ref for _, class_refs in classes for ref in class_refs]
    decode_into(images, refs, mode=mode, size=size, invert=invert, desc=f"{builder.name} {split}")
