"""Readers for image-folder sources: miniImageNet, tieredImageNet and a user's own folder.

Each returns, per split, a list of `(class_name, image_refs)` in sorted class order; nothing is
decoded here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from metatransfer.data._decode import ImageRef
from metatransfer.data._sources import ClassList, check_disjoint, check_min_images, list_images
from metatransfer.data.cache import SPLITS

__all__ = ["TIERED_MIN_IMAGES", "FOLDER_MIN_IMAGES", "read_mini", "read_tiered", "read_folder"]

# tieredImageNet uses every ImageNet image of a class (732-1300); fewer than 20 means a broken copy.
TIERED_MIN_IMAGES = 20
# A class needs at least a support and a query image.
FOLDER_MIN_IMAGES = 2


def _split_file(folder: Path, split: str, what: str) -> Path:
    path = folder / f"{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} split file {path} is missing; pass the folder with train.csv, val.csv and "
            f"test.csv as split_dir (--split-dir)"
        )
    return path


def _tree(source: Path, where: str) -> dict[str, ClassList]:
    """`SOURCE/<split>/<class>/<image>` -> split -> class list."""
    splits: dict[str, ClassList] = {}
    for split in SPLITS:
        folder = source / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{where}: {folder} is missing; a split tree needs train/, val/ and test/"
            )
        class_dirs = sorted(path for path in folder.iterdir() if path.is_dir())
        splits[split] = [(path.name, [("", f) for f in list_images(path)]) for path in class_dirs]
        if not splits[split]:
            raise ValueError(f"{where}: {folder} has no class folders")
    check_disjoint(
        {split: [name for name, _ in classes] for split, classes in splits.items()}, where
    )
    return splits


def read_mini(source: Path, split_dir: Path | None) -> tuple[dict[str, ClassList], str]:
    """Ravi & Larochelle CSVs (`filename,label`) + `images/`, or a train/val/test tree."""
    csv_dir = split_dir or source
    if split_dir is None and not (source / "train.csv").is_file() and (source / "train").is_dir():
        return _tree(
            source, f"miniImageNet tree {source}"
        ), "miniimagenet (train/val/test class folders)"
    images_dir = source / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"miniImageNet: {images_dir} is missing; the source must hold images/ with the jpgs "
            f"named in the split CSVs, or train/, val/, test/ class folders"
        )
    present = set(path.name for path in images_dir.iterdir())
    splits: dict[str, ClassList] = {}
    for split in SPLITS:
        path = _split_file(csv_dir, split, "miniImageNet")
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != ["filename", "label"]:
                raise ValueError(f"{path}: header is {reader.fieldnames}, expected filename,label")
            per_class: dict[str, list[ImageRef]] = {}
            for row in reader:
                if row["filename"] not in present:
                    raise FileNotFoundError(
                        f"{path} names {row['filename']} (class {row['label']}), which is not in "
                        f"{images_dir}; the image folder is incomplete"
                    )
                per_class.setdefault(row["label"], []).append(
                    ("", str(images_dir / row["filename"]))
                )
        splits[split] = sorted(per_class.items())
    check_disjoint(
        {s: [name for name, _ in classes] for s, classes in splits.items()},
        f"miniImageNet CSVs in {csv_dir}",
    )
    return splits, f"miniimagenet ravi & larochelle split (CSVs from {csv_dir})"


def read_tiered(source: Path, split_dir: Path | None) -> tuple[dict[str, ClassList], str]:
    """Split CSVs (`class_synset,category_synset`, no header) + `SOURCE[/train]/<synset>/`."""
    csv_dir = split_dir or source
    image_root = source / "train" if (source / "train").is_dir() else source
    class_names: dict[str, list[str]] = {}
    for split in SPLITS:
        path = _split_file(csv_dir, split, "tieredImageNet")
        with open(path, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
        if any(len(row) != 2 or not row[0].startswith("n") for row in rows):
            raise ValueError(f"{path}: expected rows class_synset,category_synset without a header")
        class_names[split] = sorted(row[0] for row in rows)
    check_disjoint(class_names, f"tieredImageNet CSVs in {csv_dir}")
    splits: dict[str, ClassList] = {}
    for split, names in class_names.items():
        missing = [name for name in names if not (image_root / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"tieredImageNet: no image folder for classes {', '.join(missing[:10])} "
                f"({len(missing)} missing) in {image_root}; it must hold ImageNet train folders "
                f"named by synset"
            )
        splits[split] = [
            (name, [("", f) for f in list_images(image_root / name)]) for name in names
        ]
        check_min_images(splits[split], TIERED_MIN_IMAGES, f"tieredImageNet {split}")
    return (
        splits,
        f"tieredimagenet ren et al. split (CSVs from {csv_dir}), all images of each class",
    )


def read_folder(
    source: Path, split_ratios: tuple[float, float, float], seed: int
) -> tuple[dict[str, ClassList], str]:
    """`SOURCE/<split>/<class>/` as given, else `SOURCE/<class>/` split class-disjointly.

    A ratio of 0 leaves its split empty on purpose: ratios (0, 0, 1) make an evaluation-only
    dataset (every class in test) for scoring a model trained elsewhere (`mtl meta-test --dataset`).
    """
    if any((source / split).is_dir() for split in SPLITS):
        splits = _tree(source, f"folder {source}")
        protocol = "folder with train/val/test class folders as given"
    else:
        class_dirs = sorted(
            path for path in source.iterdir() if path.is_dir() and not path.name.startswith(".")
        )
        if len(split_ratios) != 3 or min(split_ratios) < 0 or abs(sum(split_ratios) - 1) > 1e-6:
            raise ValueError(
                f"split_ratios must be three non-negative numbers summing to 1, got {split_ratios}"
            )
        order = np.random.default_rng(seed).permutation(len(class_dirs))
        n_train = round(split_ratios[0] * len(class_dirs))
        n_val = round(split_ratios[1] * len(class_dirs))
        bounds = {
            "train": (0, n_train),
            "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, len(class_dirs)),
        }
        splits = {}
        for (split, (start, stop)), ratio in zip(bounds.items(), split_ratios):
            chosen = sorted(class_dirs[i] for i in order[start:stop])
            if not chosen and (ratio > 0 or split == "test"):
                raise ValueError(
                    f"folder {source}: {len(class_dirs)} classes split by {split_ratios} leaves "
                    f"no class for {split!r}; add classes or change split_ratios"
                )
            splits[split] = [(path.name, [("", f) for f in list_images(path)]) for path in chosen]
        protocol = f"folder split by class, ratios {list(split_ratios)}, seed {seed}"
        if split_ratios[0] == split_ratios[1] == 0:
            protocol = "folder for evaluation only: every class in test (ratios 0,0,1)"
    for split, classes in splits.items():
        check_min_images(classes, FOLDER_MIN_IMAGES, f"folder {split}")
    return splits, protocol
