"""Download the canonical benchmark archives, verified by md5.

Only Omniglot and CIFAR-100 have stable public URLs; miniImageNet and tieredImageNet images come
from ImageNet, which must be obtained by hand. Set `METATRANSFER_MIRROR` (or pass `mirror=`) to a
base URL that serves the same file names to use a mirror instead of the canonical hosts.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metatransfer.progress import progress_bar

__all__ = [
    "RemoteFile",
    "DOWNLOADS",
    "MIRROR_ENV",
    "download_file",
    "download_benchmark",
    "file_md5",
]

MIRROR_ENV = "METATRANSFER_MIRROR"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_OMNIGLOT = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
_CIFAR100 = RemoteFile(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"
)
# benchmark -> the files its `prepare` needs (reference.md section 5 gives the checksums).
DOWNLOADS: dict[str, tuple[RemoteFile, ...]] = {
    "omniglot": (
        RemoteFile(_OMNIGLOT + "images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
        RemoteFile(_OMNIGLOT + "images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
    ),
    "fc100": (_CIFAR100,),
    "cifar-fs": (_CIFAR100,),
}


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: str | Path,
    md5: str,
    *,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch `url` to `dest` via a temporary name and keep it only if its md5 matches.

    An existing `dest` with the right md5 is reused without downloading.

    Raises:
        ValueError: the md5 differs (the downloaded file is deleted).
        OSError: the download failed (nothing is left behind).
    """
    dest = Path(dest)
    if dest.is_file() and file_md5(dest) == md5:
        log(f"{dest.name}: already downloaded, md5 ok")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    digest = hashlib.md5()
    log(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while block := response.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != md5:
            raise ValueError(
                f"md5 mismatch for {url}: got {digest.hexdigest()}, expected {md5}; the file was "
                f"deleted. Retry, or download it by hand and pass it with --source"
            )
        os.replace(partial, dest)
    except urllib.error.URLError as error:
        raise OSError(
            f"Could not download {url}: {error.reason}; check the network or mirror"
        ) from error
    finally:
        partial.unlink(missing_ok=True)
    return dest


def download_benchmark(
    name: str,
    folder: str | Path,
    *,
    mirror: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Download the archives `name` needs into `folder` (normally `ROOT/downloads`).

    Args:
        mirror: base URL replacing the canonical hosts; default `$METATRANSFER_MIRROR`.
    """
    if name not in DOWNLOADS:
        raise ValueError(
            f"No download for {name!r}; downloads exist for {', '.join(DOWNLOADS)}. "
            f"Obtain the images by hand and pass them with --source"
        )
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
    paths = []
    for remote in DOWNLOADS[name]:
        url = f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url
        paths.append(download_file(url, Path(folder) / remote.filename, remote.md5, log=log))
    return paths
