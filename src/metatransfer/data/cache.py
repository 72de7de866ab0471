"""The prepared-dataset cache: one folder of memory-mappable arrays per dataset.

Layout (format version 1), as in nanoGPT's `data/<name>/prepare.py`: prepare once, then training
only memory-maps the result.

    ROOT/<name>/manifest.json
    ROOT/<name>/<split>/images.npy   uint8 (N, H, W, C), C = 1 (grayscale) or 3 (RGB)
    ROOT/<name>/<split>/labels.npy   int64 (N,), 0..num_classes-1, sorted

for the splits "train", "val" and "test". The manifest is written last and the folder is renamed
into place only when complete, so a folder with a manifest is always a whole cache.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "ImageSplit",
    "CacheBuilder",
    "load_split",
    "read_manifest",
    "describe",
    "write_cache",
]

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
_MANIFEST = "manifest.json"
_STATS_CHUNK = 4096  # images per chunk when computing mean/std, so memory stays small


@dataclass(frozen=True)
class ImageSplit:
    """One split of a prepared dataset; `images` is memory-mapped, so building this is cheap."""

    images: np.ndarray  # (N, H, W, C) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64, sorted, index into class_names
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, 0..1 scale, of the train split
    std: tuple[float, ...]
    dataset: str
    split: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _missing_message(root: Path, name: str) -> str:
    return (
        f"No prepared dataset {name!r} in {root}; "
        f"run: mtl data prepare {name} --source ... --root {root}"
    )


def read_manifest(root: str | Path, name: str) -> dict[str, Any]:
    """Read and check `ROOT/<name>/manifest.json`.

    Raises:
        FileNotFoundError: the dataset was never prepared (the message says how to prepare it).
        ValueError: the manifest is unreadable or of another format version.
    """
    root = Path(root)
    path = root / name / _MANIFEST
    if not path.is_file():
        raise FileNotFoundError(_missing_message(root, name))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"Unreadable manifest {path}: {error}; prepare the dataset again"
        ) from error
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}, this version of metatransfer reads "
            f"{FORMAT_VERSION}; prepare the dataset again with `mtl data prepare {name} ...`"
        )
    return manifest


def load_split(root: str | Path, name: str, split: str) -> ImageSplit:
    """Memory-map one split and check that the arrays agree with the manifest."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    manifest = read_manifest(root, name)
    info = manifest["splits"][split]
    folder = Path(root) / name / split
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")
    except (OSError, ValueError) as error:
        raise ValueError(f"Damaged cache {folder}: {error}; prepare {name!r} again") from error
    height, width = manifest["image_size"]
    expected_shape = (info["num_images"], height, width, manifest["channels"])
    problem = None
    if images.dtype != np.uint8 or images.shape != expected_shape:
        problem = f"images are {images.dtype} {images.shape}, manifest says uint8 {expected_shape}"
    elif labels.dtype != np.int64 or labels.shape != (info["num_images"],):
        problem = (
            f"labels are {labels.dtype} {labels.shape}, manifest says int64 ({info['num_images']},)"
        )
    elif np.bincount(labels, minlength=len(info["classes"])).tolist() != info["images_per_class"]:
        problem = "labels disagree with the manifest's images_per_class"
    if problem:
        raise ValueError(f"Damaged cache {folder}: {problem}; prepare {name!r} again")
    return ImageSplit(
        images=images,
        labels=labels,
        class_names=list(info["classes"]),
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
        dataset=name,
        split=split,
    )


def describe(root: str | Path, name: str) -> str:
    """Human-readable summary of a prepared dataset, for `mtl data info`."""
    manifest = read_manifest(root, name)
    height, width = manifest["image_size"]
    source = manifest["source"]
    lines = [
        f"dataset   {manifest['dataset']}  ({Path(root) / name})",
        f"protocol  {manifest['protocol']}",
        f"images    {height}x{width}, {manifest['channels']} channel(s), uint8",
    ]
    for split in SPLITS:
        info = manifest["splits"][split]
        low, high = min(info["images_per_class"], default=0), max(info["images_per_class"], default=0)
        per_class = f"{low}" if low == high else f"{low}-{high}"
        lines.append(
            f"{split:<9} {len(info['classes'])} classes, {info['num_images']} images "
            f"({per_class} per class)"
        )
    lines.append(f"source    {source['path']}")
    lines.append(f"sha256    {source['sha256'] or '(folder, none)'}")
    if source.get("content_digest"):
        lines.append(f"content   {source['content_digest']} (sha256 of the sorted 'name sha256' lines of its images)")
    for file_name, digest in source.get("files", {}).items():
        lines.append(f"          {file_name}: {digest}")
    lines.append("mean      " + ", ".join(f"{value:.4f}" for value in manifest["mean"]))
    lines.append("std       " + ", ".join(f"{value:.4f}" for value in manifest["std"]))
    lines.append("options   " + json.dumps(manifest["options"], sort_keys=True))
    return "\n".join(lines)


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale, in chunks so a memmap is never loaded whole."""
    channels = images.shape[-1]
    total = np.zeros(channels, dtype=np.float64)
    total_sq = np.zeros(channels, dtype=np.float64)
    for start in range(0, len(images), _STATS_CHUNK):
        chunk = np.asarray(images[start : start + _STATS_CHUNK], dtype=np.float64) / 255.0
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += (chunk**2).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


class CacheBuilder:
    """Builds a cache in `ROOT/.<name>.tmp-<pid>` and renames it into place on `commit`.

    Use as a context manager: leaving the block without a commit (any exception) removes the
    temporary folder, so nothing partial is ever left behind.
    """

    def __init__(self, root: str | Path, name: str) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"Invalid dataset name {name!r}: use a plain folder name")
        self.root = Path(root)
        self.name = name
        self.temp = self.root / f".{name}.tmp-{os.getpid()}"
        self._splits: dict[str, dict[str, Any]] = {}
        self._shape: tuple[int, int, int] | None = None

    def __enter__(self) -> CacheBuilder:
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir()
        return self

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Remove temp folders left by killed runs (their process no longer exists)."""
        for path in self.root.glob(f".{self.name}.*-*"):
            kind, _, pid = path.name[len(self.name) + 2 :].partition("-")
            if kind not in ("tmp", "old") or not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass  # alive, or not ours to judge

    def new_split(
        self,
        split: str,
        labels: np.ndarray,
        class_names: list[str],
        image_shape: tuple[int, int, int],
    ) -> np.ndarray:
        """Write `labels` and return a writable (N, H, W, C) uint8 memmap for the images."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if self._shape is not None and tuple(image_shape) != self._shape:
            raise ValueError(f"Split {split!r} has image shape {image_shape}, others {self._shape}")
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels, minlength=len(class_names))
        if len(labels) and (labels.min() < 0 or len(counts) != len(class_names)):
            raise ValueError(f"Split {split!r}: labels must lie in 0..{len(class_names) - 1}")
        if np.any(np.diff(labels) < 0):
            raise ValueError(f"Split {split!r}: labels must be sorted")
        empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"Split {split!r}: no images for classes {empty}")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"Split {split!r}: class names repeat")
        self._shape = tuple(image_shape)
        folder = self.temp / split
        folder.mkdir()
        np.save(folder / "labels.npy", labels)
        images = np.lib.format.open_memmap(
            folder / "images.npy", mode="w+", dtype=np.uint8, shape=(len(labels), *image_shape)
        )
        self._splits[split] = {
            "classes": list(class_names),
            "num_images": int(len(labels)),
            "images_per_class": counts.tolist(),
            "_images": images,
        }
        return images

    def images_per_class(self, split: str) -> list[int]:
        """Counts of a split written so far (for the benchmark check before committing)."""
        return list(self._splits[split]["images_per_class"])

    def commit(
        self,
        *,
        source_path: str | Path,
        source_sha256: str | None,
        protocol: str,
        options: dict[str, Any],
        source_files: dict[str, str] | None = None,
        content_digest: str | None = None,
    ) -> Path:
        """Compute train mean/std, write the manifest last, and rename the folder into place.

        `content_digest` names a folder source by its images' pixels (`_sources.content_digest`),
        where `source_sha256` is the checksum of a source archive."""
        missing = [split for split in SPLITS if split not in self._splits]
        if missing:
            raise ValueError(f"Cannot commit {self.name!r}: splits {missing} were never written")
        for info in self._splits.values():
            info.pop("_images").flush()
        # Normalisation comes from the train split; an evaluation-only dataset (no train classes)
        # has its test split's, which only `mtl meta-test --dataset` reads (it uses the run's own).
        stats_split = "train" if self._splits["train"]["num_images"] else "test"
        images = np.load(self.temp / stats_split / "images.npy", mmap_mode="r")
        mean, std = _channel_stats(images)
        del images
        height, width, channels = self._shape
        source = {"path": str(source_path), "sha256": source_sha256}
        if source_files:
            source["files"] = dict(source_files)
        if content_digest:
            source["content_digest"] = content_digest
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": self.name,
            "image_size": [height, width],
            "channels": channels,
            "splits": {split: self._splits[split] for split in SPLITS},
            "mean": mean,
            "std": std,
            "stats_split": stats_split,
            "source": source,
            "protocol": protocol,
            "options": options,
        }
        (self.temp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        final = self.root / self.name
        old = self.root / f".{self.name}.old-{os.getpid()}"
        if final.exists():
            # Two renames: the old cache stays whole until the new one is complete.
            os.replace(final, old)
        try:
            os.replace(self.temp, final)
        except OSError:
            if old.exists():
                os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return final


def write_cache(
    root: str | Path,
    name: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]],
    *,
    source_path: str | Path,
    source_sha256: str | None,
    protocol: str,
    options: dict[str, Any],
) -> Path:
    """Write in-memory arrays as a cache; see `CacheBuilder` for the atomic build.

    Args:
        splits: split name -> (images (N, H, W, C) uint8, labels (N,) sorted, class names).

    Returns:
        The dataset folder `ROOT/<name>`.
    """
    with CacheBuilder(root, name) as builder:
        for split in SPLITS:
            if split not in splits:
                raise ValueError(f"write_cache needs the splits {SPLITS}; {split!r} is missing")
            images, labels, class_names = splits[split]
            if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
                raise ValueError(
                    f"Split {split!r}: need uint8 images (N, H, W, C) and N labels, got "
                    f"{images.dtype} {images.shape} and {len(labels)} labels"
                )
            target = builder.new_split(split, labels, class_names, images.shape[1:])
            target[:] = images
        return builder.commit(
            source_path=source_path, source_sha256=source_sha256, protocol=protocol, options=options
        )
