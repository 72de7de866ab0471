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


def _read_mini_csvs(csv_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Ravi & Larochelle's split CSVs: split -> [(filename, class)], header checked."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for split in SPLITS:
        path = _split_file(csv_dir, split, "miniImageNet")
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != ["filename", "label"]:
                raise ValueError(f"{path}: header is {reader.fieldnames}, expected filename,label")
            rows[split] = [(row["filename"], row["label"]) for row in reader]
    check_disjoint(
        {s: sorted({label for _, label in split_rows}) for s, split_rows in rows.items()},
        f"miniImageNet CSVs in {csv_dir}",
    )
    return rows


def _match_csvs(
    rows: dict[str, list[tuple[str, str]]],
    found: dict[str, str],
    where: str,
    csv_dir: Path,
    *,
    class_folders: bool = True,
    split_folders: bool = False,
) -> dict[str, ClassList]:
    """Give every CSV row its file (`found`: file name -> path) and refuse files no CSV names.

    With `class_folders` (images in `<class>/` folders), classes must agree both ways: a class
    folder no CSV lists (an extra class) and a CSV class without images (a missing class) are both
    errors that name the class, and a file's folder must be its CSV class. With `split_folders`
    (`<split>/<class>/` trees), the folder above the class must be the file's CSV split.
    """
    listed = {label for split_rows in rows.values() for _, label in split_rows}
    on_disk = {Path(path).parent.name for path in found.values()} if class_folders else set()
    extra = sorted(on_disk - listed)
    if extra:
        raise ValueError(
            f"{where}: class folders {', '.join(extra[:10])} are in no split CSV of {csv_dir}; "
            f"this is not miniImageNet's class set: remove them or use the folder benchmark"
        )
    splits: dict[str, ClassList] = {}
    named: set[str] = set()
    for split, split_rows in rows.items():
        per_class: dict[str, list[ImageRef]] = {}
        for filename, label in split_rows:
            path = found.get(filename)
            if path is None:
                raise FileNotFoundError(
                    f"{where}: {csv_dir / (split + '.csv')} names {filename} (class {label}), "
                    f"which is not in the source; the copy is incomplete: fetch it again"
                )
            if split_folders and Path(path).parent.parent.name != split:
                raise ValueError(f"{where}: {path} is a {split} image in another split's folder")
            if class_folders and Path(path).parent.name != label:
                raise ValueError(
                    f"{where}: {path} lies in folder {Path(path).parent.name}, but "
                    f"{split}.csv gives it class {label}; the copy's labels are not Ravi's"
                )
            named.add(filename)
            per_class.setdefault(label, []).append(("", path))
        splits[split] = sorted(per_class.items())
    unnamed = sorted(set(found) - named)
    if unnamed:
        raise ValueError(
            f"{where}: {len(unnamed)} image(s) no split CSV names, e.g. {found[unnamed[0]]}; "
            f"remove them (miniImageNet has exactly the CSVs' 60,000 images)"
        )
    return splits


def _image_files(folders: list[Path], where: str) -> dict[str, str]:
    """File name -> path for every image in `folders/<class>/`; a name twice is an error."""
    found: dict[str, str] = {}
    for folder in folders:
        for class_dir in sorted(path for path in folder.iterdir() if path.is_dir()):
            for path in list_images(class_dir):
                name = Path(path).name
                if name in found:
                    raise ValueError(f"{where}: {name} is both {found[name]} and {path}; keep one")
                found[name] = path
    return found


def read_mini(source: Path, split_dir: Path | None) -> tuple[dict[str, ClassList], str]:
    """miniImageNet in any of the layouts its public copies come in.

    - `images/` + Ravi & Larochelle's CSVs (`filename,label`): the original `images.zip`.
    - `train/ val/ test/` class folders with the CSVs beside them (or in `split_dir`): every file
      is checked against the CSVs. Without CSVs, the tree is taken as it is.
    - `train/ val/` class folders holding all 100 classes, split by image (500 / 100 a class,
      mini-imagenet-tools' output): the Ravi split is rebuilt from the file names and the CSVs,
      which must be in the source or `split_dir` (for example ../shared/data/miniimagenet/splits/ravi).
    """
    csv_dir = split_dir or source
    # A --split-dir is always read (a wrong one is an error, never silently ignored); without one,
    # CSVs beside the images are used when there.
    has_csvs = split_dir is not None or (source / "train.csv").is_file()
    where = f"miniImageNet {source}"
    if (source / "images").is_dir():
        rows = _read_mini_csvs(csv_dir)
        found = {Path(path).name: path for path in list_images(source / "images")}
        return _match_csvs(rows, found, where, csv_dir, class_folders=False), (
            f"miniimagenet ravi & larochelle split, images/ + CSVs from {csv_dir}"
        )
    if all((source / split).is_dir() for split in SPLITS):
        if not has_csvs:
            return _tree(source, f"miniImageNet tree {source}"), (
                "miniimagenet train/val/test class folders (no split CSVs to check against)"
            )
        rows = _read_mini_csvs(csv_dir)
        found = _image_files([source / split for split in SPLITS], where)
        splits = _match_csvs(rows, found, where, csv_dir, split_folders=True)
        return splits, f"miniimagenet train/val/test class folders, checked against the CSVs in {csv_dir}"
    if (source / "train").is_dir() and (source / "val").is_dir() and not (source / "test").exists():
        if not has_csvs:
            raise FileNotFoundError(
                f"{where} holds train/ and val/ but no test/: a copy split by image (500 / 100 a "
                f"class). Rebuilding the class split needs Ravi & Larochelle's train.csv, val.csv "
                f"and test.csv: pass their folder as --split-dir (../shared/data/miniimagenet/splits/ravi)"
            )
        rows = _read_mini_csvs(csv_dir)
        found = _image_files([source / "train", source / "val"], where)
        return _match_csvs(rows, found, where, csv_dir), (
            f"miniimagenet split by image (train/ + val/ of all classes), "
            f"class split rebuilt from the CSVs in {csv_dir}"
        )
    raise FileNotFoundError(
        f"{where}: no miniImageNet layout found; the source must hold images/ with the jpgs named "
        f"in the split CSVs, or train/, val/, test/ class folders (CSVs beside them are checked), "
        f"or train/ and val/ of all 100 classes (with the CSVs)"
    )


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
