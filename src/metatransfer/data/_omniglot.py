"""Omniglot (Lake et al. 2015): read the two original zips (or their extracted folders).

Two protocols:
- Lake's split (default): train = background alphabets except `VAL_ALPHABETS`, val = those five,
  test = the 20 evaluation alphabets. `rotations=True` adds each character rotated by 90, 180
  and 270 degrees as three extra classes (in every split).
- Vinyals' split (`split_dir` with train.txt/val.txt/test.txt, as in prototypical-networks):
  the classes are exactly the listed `<alphabet>/<character>/rotNNN` lines.

Images are stored INVERTED (ink 255 on background 0), the convention of most few-shot code.
Rotations are counter-clockwise, as PIL's `Image.rotate` used by prototypical-networks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from metatransfer.data._decode import ImageRef, decode_into, is_image_name, open_zip
from metatransfer.data._sources import Built, check_disjoint, sha256_file
from metatransfer.data.cache import SPLITS, CacheBuilder

__all__ = ["VAL_ALPHABETS", "build_omniglot"]

# The five background alphabets of Vinyals' val split, reused as Lake-split validation.
VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
SETS = {"images_background": 964, "images_evaluation": 659}  # set -> number of characters
DRAWINGS = 20
ROTATIONS = ("rot000", "rot090", "rot180", "rot270")
VINYALS_CLASSES = {"train": 4112, "val": 688, "test": 1692}


def _index(source: Path) -> tuple[dict[str, tuple[str, list[ImageRef]]], dict[str, str]]:
    """Map "alphabet/characterNN" -> (set, sorted image refs); also return archive checksums."""
    characters: dict[str, tuple[str, list[ImageRef]]] = {}
    files: dict[str, str] = {}
    for set_name in SETS:
        archive, folder = source / f"{set_name}.zip", source / set_name
        if archive.is_file():
            with open_zip(archive) as handle:
                members = [name for name in handle.namelist() if is_image_name(name)]
            refs = [(str(archive), name) for name in members]
            files[archive.name] = sha256_file(archive)
        elif folder.is_dir():
            members = [str(path.relative_to(source)) for path in folder.glob("*/*/*")]
            refs = [("", str(source / name)) for name in members if is_image_name(name)]
            members = [name for name in members if is_image_name(name)]
        else:
            raise FileNotFoundError(
                f"Omniglot source {source} has neither {archive.name} nor {folder.name}/; pass the "
                f"folder holding images_background.zip and images_evaluation.zip, or use --download"
            )
        for member, ref in zip(members, refs):
            parts = member.split("/")
            if len(parts) != 4 or parts[0] != set_name:
                continue  # e.g. macOS metadata folders
            key = f"{parts[1]}/{parts[2]}"
            characters.setdefault(key, (set_name, []))[1].append(ref)
    for _, refs in characters.values():
        refs.sort()
    return characters, files


def _check_counts(
    characters: dict[str, tuple[str, list[ImageRef]]], log: Callable[[str], None]
) -> None:
    for set_name, expected in SETS.items():
        found = [key for key, (owner, _) in characters.items() if owner == set_name]
        if len(found) != expected:
            raise ValueError(
                f"Omniglot {set_name}: found {len(found)} characters, expected {expected}; "
                f"the archive is incomplete: download it again"
            )
    short = [key for key, (_, refs) in characters.items() if len(refs) != DRAWINGS]
    if short:
        raise ValueError(
            f"Omniglot characters without exactly {DRAWINGS} drawings: {', '.join(short[:10])}; "
            f"the archive is incomplete: download it again"
        )
    log(
        f"omniglot: {SETS['images_background']} background + {SETS['images_evaluation']} "
        f"evaluation characters, {DRAWINGS} drawings each, as expected"
    )


def _read_vinyals(split_dir: Path, characters: dict) -> dict[str, list[str]]:
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"Split file {path} is missing; --split-dir needs train.txt, val.txt, test.txt"
            )
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for line in lines:
            parts = line.split("/")
            if len(parts) != 3 or parts[2] not in ROTATIONS:
                raise ValueError(
                    f"{path}: bad line {line!r}; expected "
                    "<alphabet>/<characterNN>/rot000|rot090|rot180|rot270"
                )
            if f"{parts[0]}/{parts[1]}" not in characters:
                raise FileNotFoundError(
                    f"{path} names character {parts[0]}/{parts[1]}, which is not in the Omniglot "
                    f"source; check that the split file belongs to Omniglot"
                )
        classes[split] = lines
    check_disjoint(classes, f"Omniglot split files in {split_dir}")
    return classes


def _lake_classes(characters: dict, rotations: bool) -> dict[str, list[str]]:
    base: dict[str, list[str]] = {split: [] for split in SPLITS}
    for key in sorted(characters):
        set_name = characters[key][0]
        alphabet = key.split("/")[0]
        split = (
            "test"
            if set_name == "images_evaluation"
            else "val"
            if alphabet in VAL_ALPHABETS
            else "train"
        )
        base[split].append(key)
    if not rotations:
        return base
    return {
        split: [
            f"{key}/{rotation}" if rotation != "rot000" else key
            for key in keys
            for rotation in ROTATIONS
        ]
        for split, keys in base.items()
    }


def build_omniglot(
    builder: CacheBuilder,
    source: Path,
    *,
    split_dir: Path | None,
    rotations: bool,
    image_size: int,
    log: Callable[[str], None],
) -> Built:
    characters, files = _index(source)
    _check_counts(characters, log)
    if split_dir is not None:
        if rotations:
            raise ValueError(
                "rotations=True applies to Lake's split only; the Vinyals split files already "
                "list rotations"
            )
        classes = _read_vinyals(Path(split_dir), characters)
        protocol = f"omniglot vinyals + rotations (split files from {split_dir})"
        expected = {split: (count, DRAWINGS) for split, count in VINYALS_CLASSES.items()}
    else:
        classes = _lake_classes(characters, rotations)
        protocol = (
            "omniglot lake: train = background alphabets except val, val = "
            f"{', '.join(VAL_ALPHABETS)}, test = evaluation alphabets"
            + (", + rotations 90/180/270 as extra classes" if rotations else "")
        )
        expected = {split: (len(names), DRAWINGS) for split, names in classes.items()}
    # Decode every character once, then copy (and rotate) into each split.
    keys = sorted(characters)
    position = {key: index for index, key in enumerate(keys)}
    refs = [ref for key in keys for ref in characters[key][1]]
    decoded = np.empty((len(refs), image_size, image_size, 1), dtype=np.uint8)
    decode_into(decoded, refs, mode="L", size=image_size, invert=True, desc="omniglot")
    decoded = decoded.reshape(len(keys), DRAWINGS, image_size, image_size, 1)
    for split in SPLITS:
        names = classes[split]
        labels = np.repeat(np.arange(len(names), dtype=np.int64), DRAWINGS)
        images = builder.new_split(split, labels, names, (image_size, image_size, 1))
        for label, name in enumerate(names):
            parts = name.split("/")
            turns = ROTATIONS.index(parts[2]) if len(parts) == 3 else 0
            drawings = decoded[position[f"{parts[0]}/{parts[1]}"]]
            images[label * DRAWINGS : (label + 1) * DRAWINGS] = np.rot90(
                drawings, turns, axes=(1, 2)
            )
    return Built(
        source_path=source, sha256=None, protocol=protocol, expected=expected, files=files or None
    )
