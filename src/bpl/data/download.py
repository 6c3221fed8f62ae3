"""Downloading a dataset archive: verified, unpacked beside its destination, moved in whole."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from ..errors import ChecksumError, DataError, arg
from .registry import DatasetSpec

log = logging.getLogger(__name__)

# Not torchvision's check_integrity: that checks md5 only and returns a bool; this also checks the
# size and sha256 and says which differs.
def verify_file(
    path: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    label: str | None = None,
) -> None:
    """Check a file's byte size and md5/sha256; raise ChecksumError naming what differs.

    ``label`` names the file in the message (e.g. the URL it was downloaded from).
    """
    path = Path(path)
    label = label or str(path)
    if size is not None and path.stat().st_size != size:
        raise ChecksumError(
            f"{label} has {path.stat().st_size} bytes but {size} were expected; the download is "
            "incomplete or the file changed upstream: retry, or pass the new size"
        )
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want is None:
            continue
        h = hashlib.new(algo)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest().lower() != want.lower():
            raise ChecksumError(
                f"{label} has {algo} {h.hexdigest()} but {want} was expected; the download is "
                "corrupt or the file changed upstream: retry, or pass the new checksum"
            )


def _fetch(url: str, archive: Path, dest: Path, progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(archive, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download",
                      disable=None if progress else True) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(
            f"cannot download {url} ({exc}); check the network, or download and unpack it "
            f"by hand into {dest}"
        ) from exc


# Not torchvision's download_and_extract_archive: that unpacks into the destination itself, so a
# failed download leaves half a folder; this moves a complete folder in.
def download_and_extract(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
) -> Path:
    """Download a zip archive, verify it, unpack it to a temp folder, then rename it to ``dest``.

    Nothing half-written is left behind: the archive and the temp folder sit next to
    ``dest`` and are removed on any failure; ``dest`` appears only once complete.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(
            f"cannot unpack into {dest}: it exists and is not empty; remove it or pick another root"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    if md5 is None and sha256 is None and size is None:
        log.warning("no checksum known for %s: the download is not verified", url)
    fd, archive = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".zip")
    os.close(fd)
    tmpdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.part-"))
    try:
        _fetch(url, Path(archive), dest, progress)
        verify_file(archive, md5=md5, sha256=sha256, size=size, label=f"download of {url}")
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmpdir)
        except zipfile.BadZipFile as exc:
            raise DataError(
                f"{url} is not a valid zip archive ({exc}); retry the download"
            ) from exc
        if dest.exists():
            dest.rmdir()
        os.replace(tmpdir, dest)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    finally:
        Path(archive).unlink(missing_ok=True)
    log.info("unpacked %s into %s", url, dest)
    return dest


def resolve_root(spec: DatasetSpec, root: Path, download: bool, progress: bool = True) -> Path:
    """The folder holding the class folders (or train/ + test/), downloading it if asked."""
    if download and not _has_files(root):
        if spec.url is None:
            raise DataError(
                f"no download address is known for {spec.name}; download it by hand and pass "
                f"its folder as {arg('root')}", param="download"
            )
        download_and_extract(spec.url, root, md5=spec.md5, sha256=spec.sha256, progress=progress)
    if not root.is_dir():
        fix = f", or pass {arg('download', True)}" if spec.url else ""
        raise DataError(
            f"dataset folder not found: {root}; pass the folder with one sub-folder per class as "
            f"{arg('root')}{fix}", param="root"
        )
    for sub in spec.subdirs:
        if (root / sub).is_dir():
            return root / sub
    return root


def _has_files(root: Path) -> bool:
    return root.is_dir() and any(True for _ in root.iterdir())


