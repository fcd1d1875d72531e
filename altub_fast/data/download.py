"""Download and extract MVTec AD (SPEC section 5), with resumable transfers and atomic installs.

MVTec AD is distributed as a single ~4.9 GB ``tar.xz`` holding all fifteen categories, so fetching one
category means fetching the whole archive once: it is cached under ``<root>/.downloads/`` and later
calls extract further categories from the cache without touching the network.

Guarantees:

- Transfers go to ``<file>.part`` and resume with HTTP ``Range`` requests after a broken connection or
  a socket timeout; a server that ignores ``Range`` (answers 200) restarts the file from byte 0.
  Attempts are bounded (``max_attempts``) and every socket has a timeout.
- The SHA-256 of the finished file is checked before it is renamed into place; a mismatch deletes the
  file and raises :class:`ChecksumError` naming the expected and the actual digest.
- Extraction is atomic: members are written into a temporary folder inside ``root``, a completion
  marker is written last inside that folder, then the category folder is moved into place with
  ``os.replace``. A folder without the marker is never treated as complete.
- Unsafe members (absolute paths, ``..``, links, devices) raise :class:`UnsafeArchiveError`.

The markers, the atomic install and the extraction are in ``install.py`` (re-exported here).

MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial use; cite Bergmann et al.); the notice is printed
to stderr whenever a download or extraction actually happens.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Dict, Optional, Sequence, Tuple, Union

from .install import (COMPLETE_MARKER, UnsafeArchiveError, extract_categories, install_atomically,  # noqa: F401
                      is_complete, read_marker)
from .mvtec import MVTEC_CATEGORIES, DatasetError

__all__ = [
    "ChecksumError",
    "COMPLETE_MARKER",
    "DownloadError",
    "LICENSE_NOTICE",
    "MVTEC_ARCHIVE_NAME",
    "MVTEC_SHA256",
    "MVTEC_URL",
    "UnsafeArchiveError",
    "download_category",
    "download_file",
    "download_mvtec",
    "extract_categories",
    "install_atomically",
    "is_complete",
    "read_marker",
    "sha256_file",
]

MVTEC_URL = (
    "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
    "420938113-1629960298/mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_ARCHIVE_NAME = "mvtec_anomaly_detection.tar.xz"
LICENSE_NOTICE = (
    "MVTec AD is licensed under CC BY-NC-SA 4.0 (https://creativecommons.org/licenses/by-nc-sa/4.0/): "
    "non-commercial use only, share alike. If you use it, cite: P. Bergmann, K. Batzner, M. Fauser, "
    "D. Sattlegger, C. Steger, 'The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset "
    "for Unsupervised Anomaly Detection', IJCV 2021; and P. Bergmann et al., CVPR 2019. "
    "Source: https://www.mvtec.com/company/research/datasets/mvtec-ad"
)

_CHUNK = 1 << 20
_DOWNLOADS = ".downloads"

PathLike = Union[str, os.PathLike]


class DownloadError(DatasetError):
    """A transfer failed for good (HTTP error, or no progress after the allowed attempts)."""


class ChecksumError(DownloadError):
    """A downloaded file's SHA-256 differs from the expected one; the file has been deleted."""


# ---------------------------------------------------------------------------------------------------
# transfers

def sha256_file(path: PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, sha256: Optional[str], source: str) -> None:
    """Raise :class:`ChecksumError` (after deleting ``path``) if its digest is not ``sha256``."""
    if sha256 is None:
        return
    got = sha256_file(path)
    if got.lower() != sha256.lower():
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"SHA-256 mismatch for {source} (saved as {path}): expected {sha256.lower()}, got {got}; "
            "the file has been deleted"
        )


def _content_range(header: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """(first byte, total size) from a ``Content-Range: bytes a-b/n`` header; ``None`` where unknown."""
    if not header or not header.startswith("bytes "):
        return None, None
    spec, _, total = header[6:].partition("/")
    first = spec.partition("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _fetch_once(url: str, part: Path, timeout: float, chunk_size: int,
                show_progress: bool) -> Tuple[bool, Optional[int]]:
    """One HTTP request appending to ``part`` from its current size.

    Returns ``(finished, total)``: ``finished`` when the server sent everything it announced
    (or, without a length, until it closed the stream). Network failures propagate to the caller.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "altub_fast"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # the .part may already hold the whole file; let the checksum decide, else restart
            _, total = _content_range(exc.headers.get("Content-Range"))
            exc.close()
            if total == offset:
                return True, total
            part.unlink()
            return False, None
        raise
    with response:
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:  # not the range asked for: start over on the next attempt
                part.unlink()
                return False, total
            mode = "ab"
        else:  # 200: the server ignored Range (or there was nothing to resume)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        received = offset
        bar = None
        if show_progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5],
                       file=sys.stderr)
        try:
            with open(part, mode) as fh:
                while True:
                    block = response.read(chunk_size)
                    if not block:
                        break
                    fh.write(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    return (total is None or received >= total), total


def download_file(
    url: str,
    dest: PathLike,
    sha256: Optional[str] = None,
    *,
    timeout: float = 60.0,
    max_attempts: int = 10,
    backoff: float = 1.0,
    chunk_size: int = _CHUNK,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest + '.part'``, resuming after interruptions.

    Args:
        url: http(s) address.
        dest: final file path; if it exists and matches ``sha256`` (or ``sha256`` is None) nothing is
            fetched. An existing file that fails the check is deleted and fetched again.
        sha256: expected hex digest, checked before ``dest`` appears.
        timeout: seconds for connecting and for each socket read.
        max_attempts: requests allowed in total; each attempt after a failure resumes with ``Range``.
        backoff: seconds to wait before retry ``k`` is ``backoff * 2**(k-1)`` (capped at 30 s).
        chunk_size: bytes per read.
        progress: show a tqdm progress bar on stderr.

    Raises:
        DownloadError: an HTTP error other than a retryable 5xx, or the attempts ran out.
        ChecksumError: the finished file has the wrong digest (the file is deleted).
    """
    dest = Path(dest)
    if dest.is_file():
        try:
            _verify(dest, sha256, str(dest))
            return dest
        except ChecksumError:
            pass  # a damaged cache: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Optional[BaseException] = None
    for attempt in range(max_attempts):
        if attempt and backoff > 0:
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
        try:
            finished, _ = _fetch_once(url, part, timeout, chunk_size, progress)
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            last_error = exc
            continue
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                socket.timeout, TimeoutError) as exc:
            last_error = exc
            continue
        if finished:
            _verify(part, sha256, url)
            os.replace(part, dest)
            return dest
        last_error = DownloadError("connection closed before the announced length")
    raise DownloadError(
        f"{url}: gave up after {max_attempts} attempts ({last_error}); "
        f"partial data kept in {part} and resumed next time"
    )


# ---------------------------------------------------------------------------------------------------
# MVTec AD

def _print_license() -> None:
    print(LICENSE_NOTICE, file=sys.stderr, flush=True)


def download_mvtec(
    root: PathLike,
    categories: Optional[Sequence[str]] = None,
    *,
    url: str = MVTEC_URL,
    sha256: Optional[str] = MVTEC_SHA256,
    keep_archive: bool = True,
    overwrite: bool = False,
    **transfer_kwargs: object,
) -> Dict[str, Path]:
    """Download the MVTec AD archive (cached in ``<root>/.downloads``) and extract categories.

    Args:
        root: dataset root; categories land in ``<root>/<category>``.
        categories: names to extract; ``None`` means all fifteen of :data:`MVTEC_CATEGORIES`.
        url, sha256: where the archive is and its digest (defaults: MVTec's address from SPEC 5).
        keep_archive: keep the cached archive for later extractions (it is ~4.9 GB).
        overwrite: replace existing category folders that carry no completion marker.
        **transfer_kwargs: passed to :func:`download_file` (``timeout``, ``max_attempts``, ...).

    Returns ``{category: folder}``. Categories already complete are neither downloaded nor extracted.
    """
    root = Path(root)
    wanted = list(MVTEC_CATEGORIES if categories is None else categories)
    if not wanted:
        raise ValueError("no categories requested")
    if all(is_complete(root / c) for c in wanted):
        return {c: root / c for c in wanted}
    _print_license()
    archive = root / _DOWNLOADS / (PurePosixPath(url.split("?")[0]).name or MVTEC_ARCHIVE_NAME)
    download_file(url, archive, sha256, **transfer_kwargs)  # type: ignore[arg-type]
    result = extract_categories(archive, root, wanted, source=url, overwrite=overwrite)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return result


def download_category(
    root: PathLike,
    category: str,
    *,
    url: str = MVTEC_URL,
    sha256: Optional[str] = MVTEC_SHA256,
    keep_archive: bool = True,
    overwrite: bool = False,
    **transfer_kwargs: object,
) -> Path:
    """Make ``<root>/<category>`` available, downloading the whole MVTec AD archive if needed.

    The archive holds every category, so it is fetched once (resumable, checksummed) into
    ``<root>/.downloads`` and only ``category``'s members are extracted. An already complete category
    returns immediately. See :func:`download_mvtec` for the arguments.
    """
    return download_mvtec(root, [category], url=url, sha256=sha256, keep_archive=keep_archive,
                          overwrite=overwrite, **transfer_kwargs)[category]
