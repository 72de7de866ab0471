"""Prepare a few-shot benchmark once into the cache (`cache.py`); training only memory-maps it.

    prepare_dataset("fc100", "../shared/data/cifar100/cifar100_png.zip", "data")

Every build happens in a temporary folder that is renamed into place when complete, so running
prepare twice simply rebuilds the cache and swaps it in; an interrupted run leaves nothing
behind. After building, the class and image counts are compared with the benchmark's published
numbers: a mismatch is an error (or only a warning with `verify=False`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from metatransfer.data._cifar import build_cifar
from metatransfer.data._decode import probe_grayscale
from metatransfer.data._folders import read_folder, read_mini, read_tiered
from metatransfer.data._omniglot import build_omniglot
from metatransfer.data._sources import Built, content_digest, write_classes
from metatransfer.data.cache import SPLITS, CacheBuilder
from metatransfer.data.download import DOWNLOADS, download_benchmark

__all__ = ["DATASETS", "DEFAULT_IMAGE_SIZE", "prepare_dataset"]

DATASETS = ("omniglot", "fc100", "cifar-fs", "miniimagenet", "tieredimagenet", "folder")
DEFAULT_IMAGE_SIZE = {
    "omniglot": 28,
    "fc100": 32,
    "cifar-fs": 32,
    "miniimagenet": 84,
    "tieredimagenet": 84,
    "folder": 84,
}
MINI_EXPECTED = {"train": (64, 600), "val": (16, 600), "test": (20, 600)}
# The public copies of miniImageNet hold different pixels under the same file names, so a result must
# say which it used: the manifest records the copy's content digest (`content_digest`) and, for
# these known copies, its name.
MINI_COPIES = {
    "240741e9cd169722d45329e42b4b9cc93c0ccc3da8398b8bd87319ff3e29df02": "standard copy (JPEG quality 75, most likely the "
    "images.zip most papers used; GitHub SankhaSubhra/Few-shot-Learners data/miniimagenet)",
    "507d1d3d3d301be2767a26198557aeaa53d8262ba5d87f167d4a129b2b0a3531": "second copy (mini-imagenet-tools' output, JPEG quality 95, split by image; "
    "GitHub Deo0330/split_minidataset)",
}
TIERED_EXPECTED = {"train": (351, None), "val": (97, None), "test": (160, None)}


def _counts_text(counts: list[int], with_word: bool) -> str:
    if not counts:
        return f"0 {'classes' if with_word else ''}".rstrip()
    low, high = min(counts), max(counts)
    per_class = str(low) if low == high else f"{low}-{high}"
    return f"{len(counts)} {'classes ' if with_word else ''}x {per_class}"


def _verify(
    name: str,
    builder: CacheBuilder,
    expected: dict[str, tuple[int, int | None]] | None,
    verify: bool,
    log: Callable[[str], None],
) -> None:
    """Compare classes per split and images per class with the benchmark's numbers."""
    counts = {split: builder.images_per_class(split) for split in SPLITS}
    summary = ", ".join(
        f"{split} {_counts_text(counts[split], index == 0)}" for index, split in enumerate(SPLITS)
    )
    if expected is None:
        log(f"{name}: {summary} (own folder: no benchmark numbers to compare)")
        return
    problems = []
    for split in SPLITS:
        num_classes, per_class = expected[split]
        found = counts[split]
        if len(found) != num_classes:
            problems.append(f"{split} has {len(found)} classes, the benchmark {num_classes}")
        if per_class is not None and set(found) != {per_class}:
            problems.append(
                f"{split} has {min(found)}-{max(found)} images per class, the benchmark {per_class}"
            )
    if not problems:
        log(f"{name}: {summary} — matches the benchmark")
        return
    message = f"{name}: {summary} — does not match the benchmark: {'; '.join(problems)}"
    if verify:
        raise ValueError(f"{message}. Check the source (pass verify=False to keep it anyway)")
    log(f"warning: {message}")


def _resolve_source(
    name: str, source: str | Path | None, root: Path, download: bool, log: Callable[[str], None]
) -> Path:
    if download:
        if name not in DOWNLOADS:
            raise ValueError(
                f"download=True works for {', '.join(DOWNLOADS)} only; {name!r} images must be "
                f"obtained by hand and passed as the source"
            )
        if source is not None:
            raise ValueError("Give either a source or download=True, not both")
        paths = download_benchmark(name, root / "downloads", log=log)
        return paths[0] if name != "omniglot" else paths[0].parent
    if source is None:
        raise ValueError(
            f"Preparing {name!r} needs a source (--source PATH)"
            + (" or download=True (--download)" if name in DOWNLOADS else "")
        )
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(
            f"Source {source} does not exist; pass the folder or archive that holds {name!r}"
        )
    return source


def _build(
    name: str,
    builder: CacheBuilder,
    source: Path,
    *,
    split_dir: Path | None,
    rotations: bool,
    image_size: int,
    split_ratios: tuple[float, float, float],
    seed: int,
    log: Callable[[str], None],
) -> Built:
    if name == "omniglot":
        return build_omniglot(
            builder,
            source,
            split_dir=split_dir,
            rotations=rotations,
            image_size=image_size,
            log=log,
        )
    if name in ("fc100", "cifar-fs"):
        return build_cifar(builder, name, source, image_size=image_size, log=log)
    if not source.is_dir():
        raise ValueError(f"{name!r} needs a folder as source, got the file {source}")
    digest = None
    if name == "miniimagenet":
        splits, protocol = read_mini(source, split_dir)
        expected = MINI_EXPECTED
        digest = content_digest(splits)
        copy = MINI_COPIES.get(digest, "a copy of unknown origin: name it with this digest")
        protocol = f"{protocol}; images: {copy}"
        log(f"miniimagenet: images of the {copy}, content digest {digest[:16]}...")
    elif name == "tieredimagenet":
        splits, protocol = read_tiered(source, split_dir)
        expected = TIERED_EXPECTED
    else:
        splits, protocol = read_folder(source, split_ratios, seed)
        expected = None
    mode = "RGB"
    if name == "folder":
        refs = [
            ref for classes in splits.values() for _, class_refs in classes for ref in class_refs
        ]
        mode = "L" if probe_grayscale(refs) else "RGB"
    for split in SPLITS:
        write_classes(builder, split, splits[split], mode=mode, size=image_size)
    return Built(source_path=source, sha256=None, protocol=protocol, expected=expected, content_digest=digest)


def prepare_dataset(
    name: str,
    source: str | Path | None,
    root: str | Path,
    *,
    download: bool = False,
    split_dir: str | Path | None = None,
    rotations: bool = False,
    image_size: int | None = None,
    split_ratios: tuple[float, float, float] = (0.64, 0.16, 0.20),
    seed: int = 0,
    output_name: str | None = None,
    log: Callable[[str], None] = print,
    verify: bool = True,
) -> Path:
    """Build `ROOT/<output_name>` from a benchmark's source files.

    Args:
        name: one of `DATASETS`.
        source: archive or folder (see the README for each benchmark's accepted forms);
            None with `download=True` (omniglot, fc100, cifar-fs) fetches into `ROOT/downloads`.
        split_dir: omniglot: folder with Vinyals' train/val/test.txt; mini/tiered: the folder
            with the split CSVs (default: the source folder).
        rotations: omniglot Lake split: add 90/180/270-degree rotations as extra classes.
        image_size: square side in pixels; default per benchmark (`DEFAULT_IMAGE_SIZE`).
        split_ratios, seed: "folder" without split folders: class-disjoint random split.
        output_name: cache folder name; default the benchmark name (folder: the source's name).
        verify: raise when counts differ from the benchmark's; False only warns (fixtures).

    Returns:
        The dataset folder.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    size = image_size or DEFAULT_IMAGE_SIZE[name]
    if size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root)
    source_path = _resolve_source(name, source, root, download, log)
    if output_name is None:
        output_name = source_path.name if name == "folder" else name
    options = {
        "benchmark": name,
        "split_dir": str(split_dir) if split_dir is not None else None,
        "rotations": rotations,
        "image_size": size,
        "download": download,
    }
    if name == "folder":
        options.update(split_ratios=list(split_ratios), seed=seed)
    if (root / output_name).exists():
        log(f"{output_name}: a cache exists in {root}; rebuilding it (swapped in when complete)")
    with CacheBuilder(root, output_name) as builder:
        built = _build(
            name,
            builder,
            source_path,
            split_dir=Path(split_dir) if split_dir is not None else None,
            rotations=rotations,
            image_size=size,
            split_ratios=split_ratios,
            seed=seed,
            log=log,
        )
        _verify(output_name if name == "folder" else name, builder, built.expected, verify, log)
        folder = builder.commit(
            source_path=built.source_path.resolve(),
            source_sha256=built.sha256,
            protocol=built.protocol,
            options=options,
            source_files=built.files,
            content_digest=built.content_digest,
        )
    log(f"{output_name}: written to {folder}")
    return folder
