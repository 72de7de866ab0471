"""Decode and resize many small images, from zip members or files, in a process pool.

An image is named by a reference `(archive, member)`: `archive` is a zip path, or "" when
`member` is a plain file path. Zips are read directly, never extracted to disk.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from metatransfer.progress import progress_bar

__all__ = [
    "ImageRef",
    "IMAGE_SUFFIXES",
    "is_image_name",
    "open_zip",
    "decode_into",
    "probe_grayscale",
]

ImageRef = tuple[str, str]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
RESAMPLE = Image.Resampling.LANCZOS  # one filter for every benchmark: sharp and alias-free
_CHUNK = 512  # images per pool task: large enough to hide the inter-process overhead
_POOL_MIN = 2000  # below this many images a pool costs more than it saves
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES)


def open_zip(path: str | Path) -> zipfile.ZipFile:
    """Open a zip, turning a damaged or truncated file into a clear ValueError."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(
            f"{path} is not a readable zip archive ({error}); it may be truncated or damaged: "
            f"download it again"
        ) from error


def _read(ref: ImageRef, zips: dict[str, zipfile.ZipFile]) -> Image.Image:
    archive, member = ref
    if not archive:
        return Image.open(member)
    if archive not in zips:
        zips[archive] = open_zip(archive)
    return Image.open(io.BytesIO(zips[archive].read(member)))


def _describe(ref: ImageRef) -> str:
    archive, member = ref
    return f"{member!r} in {archive}" if archive else repr(member)


def _decode_one(ref: ImageRef, zips: dict, mode: str, size: int, invert: bool) -> np.ndarray:
    try:
        image = _read(ref, zips)
        if image.format == "JPEG":
            image.draft(mode, (size, size))  # decode JPEGs at reduced scale: much faster
        image = image.convert(mode)
        if image.size != (size, size):
            image = image.resize((size, size), RESAMPLE)
        array = np.asarray(image, dtype=np.uint8)
    except Exception as error:  # PIL, zlib and zipfile raise many types for a bad image
        raise ValueError(
            f"Cannot read image {_describe(ref)}: {error}. Replace or remove the file "
            f"(or download the archive again)"
        ) from None
    if array.ndim == 2:
        array = array[..., None]
    return 255 - array if invert else array


# Zips opened by a pool worker, kept for its lifetime: reading the central directory of a
# 60,000-member zip costs ~0.4 s, far more than decoding one chunk.
_WORKER_ZIPS: dict[str, zipfile.ZipFile] = {}


def _decode_chunk(args: tuple[Sequence[ImageRef], str, int, bool]) -> np.ndarray:
    refs, mode, size, invert = args
    return np.stack([_decode_one(ref, _WORKER_ZIPS, mode, size, invert) for ref in refs])


def _workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def decode_into(
    out: np.ndarray,
    refs: Sequence[ImageRef],
    *,
    mode: str,
    size: int,
    invert: bool = False,
    desc: str = "decoding",
) -> None:
    """Decode `refs` in order into `out` (N, size, size, C) uint8, with a pool when it pays.

    Args:
        mode: "L" (grayscale, C=1) or "RGB" (C=3).
        invert: store 255 - pixel (Omniglot: ink bright on a dark background).
    """
    assert len(out) == len(refs)
    chunks = [(refs[i : i + _CHUNK], mode, size, invert) for i in range(0, len(refs), _CHUNK)]
    workers = _workers()
    with progress_bar(total=len(refs), desc=desc, unit="img", leave=False) as bar:
        if len(refs) < _POOL_MIN or workers == 1:
            zips: dict[str, zipfile.ZipFile] = {}
            try:
                results = (
                    np.stack([_decode_one(ref, zips, mode, size, invert) for ref in chunk[0]])
                    for chunk in chunks
                )
                _fill(out, results, bar)
            finally:
                for handle in zips.values():
                    handle.close()
            return
        # forkserver: forking a process that runs threads (tests, torch) can deadlock.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            _fill(out, pool.map(_decode_chunk, chunks), bar)


def _fill(out: np.ndarray, results, bar: tqdm) -> None:
    start = 0
    for block in results:
        out[start : start + len(block)] = block
        start += len(block)
        bar.update(len(block))


def probe_grayscale(refs: Sequence[ImageRef]) -> bool:
    """True when every image is stored grayscale (reads headers only)."""
    zips: dict[str, zipfile.ZipFile] = {}
    try:
        for ref in refs:
            try:
                image_mode = _read(ref, zips).mode
            except Exception as error:
                raise ValueError(f"Cannot read image {_describe(ref)}: {error}") from None
            if image_mode not in _GRAY_MODES:
                return False
        return True
    finally:
        for handle in zips.values():
            handle.close()
