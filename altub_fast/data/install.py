"""Installing extracted data atomically: completion markers, one-rename installs, safe tar extraction.

A category folder counts as installed only when it holds the completion marker
(``.altub_complete.json``), which is written last, inside a temporary folder next to the target,
before the folder is moved into place with ``os.replace``; so a folder is there complete or not at
all. :func:`extract_categories` streams a tar archive once into such temporary folders; unsafe
members (absolute paths, ``..``, links, devices) raise :class:`UnsafeArchiveError`. The transfers
that fetch the archive are in ``download.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

from .mvtec import MVTEC_CATEGORIES, DatasetError

__all__ = ["COMPLETE_MARKER", "UnsafeArchiveError", "extract_categories", "install_atomically", "is_complete",
           "read_marker"]

COMPLETE_MARKER = ".altub_complete.json"
_CHUNK = 1 << 20

PathLike = Union[str, os.PathLike]


class UnsafeArchiveError(DatasetError):
    """An archive member would be written outside the target folder, or is a link or device."""


# ---------------------------------------------------------------------------------------------------
# markers and atomic installs

def is_complete(folder: PathLike) -> bool:
    """Whether ``folder`` holds the completion marker written by :func:`install_atomically`."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def read_marker(folder: PathLike) -> Optional[Dict[str, object]]:
    """The JSON payload of ``folder``'s completion marker, or ``None`` when it has none."""
    marker = Path(folder) / COMPLETE_MARKER
    if not marker.is_file():
        return None
    with open(marker, "r", encoding="utf-8") as fh:
        return json.load(fh)


def _write_marker(folder: Path, payload: Dict[str, object]) -> None:
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / COMPLETE_MARKER)


def install_atomically(staged: PathLike, dest: PathLike, payload: Dict[str, object],
                       overwrite: bool = False) -> Path:
    """Mark the fully written folder ``staged`` complete and move it to ``dest`` in one rename.

    ``staged`` must be on the same file system as ``dest`` (create it with ``tempfile.mkdtemp(dir=...)``
    next to ``dest``). The marker (``payload`` as JSON) is written last, inside ``staged``, so ``dest``
    appears with its marker or not at all. A ``dest`` whose marker already holds ``payload`` is kept
    (``staged`` is left for the caller's cleanup); any other existing ``dest`` is replaced only with
    ``overwrite``, else a :class:`DatasetError` is raised.
    """
    staged, dest = Path(staged), Path(dest)
    _write_marker(staged, payload)
    if read_marker(dest) == payload:
        return dest  # an identical install finished first (e.g. in another process)
    if dest.exists():
        if not overwrite:
            raise DatasetError(
                f"{dest} already exists and is not a complete install by this tool "
                f"(no {COMPLETE_MARKER}); remove it or pass overwrite=True"
            )
        # move the old folder aside (into the caller's temp area) rather than deleting in place,
        # so dest is either the old or the new folder at every instant but one rename
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=dest.parent))
        os.replace(dest, trash / dest.name)
        try:
            os.replace(staged, dest)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return dest
    try:
        os.replace(staged, dest)
    except OSError:
        if not is_complete(dest):
            raise
    return dest


# ---------------------------------------------------------------------------------------------------
# extraction

def _safe_relative(name: str) -> PurePosixPath:
    """The member name as a relative path, or :class:`UnsafeArchiveError` for absolute / ``..`` names."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(f"unsafe path in archive: {name!r}")
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")])


def _split_category(rel: PurePosixPath, wanted: Sequence[str]) -> Tuple[Optional[str], PurePosixPath]:
    """(category, path inside it) for members ``<cat>/...`` or ``<wrapper>/<cat>/...``; (None, rel) else."""
    parts = rel.parts
    if parts and parts[0] in wanted:
        return parts[0], PurePosixPath(*parts[1:])
    if len(parts) > 1 and parts[0] not in MVTEC_CATEGORIES and parts[1] in wanted:
        return parts[1], PurePosixPath(*parts[2:])
    return None, rel


def extract_categories(archive: PathLike, root: PathLike, categories: Iterable[str],
                       source: str = "", overwrite: bool = False) -> Dict[str, Path]:
    """Extract the given categories from a tar archive into ``root/<category>``, atomically.

    The archive is read once as a stream. Members of each category go to a temporary folder inside
    ``root``; once the archive is exhausted, each category gets its marker and is moved into place.
    Categories already complete under ``root`` are skipped. Raises :class:`UnsafeArchiveError` for an
    unsafe member, :class:`DatasetError` when a category is not in the archive; nothing is installed
    in either case.
    """
    archive, root = Path(archive), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(categories))
    todo = [c for c in wanted if not is_complete(root / c)]
    result = {c: root / c for c in wanted}
    if not todo:
        return result
    staging = Path(tempfile.mkdtemp(prefix=".tmp-extract-", dir=root))
    try:
        counts = {c: 0 for c in todo}
        seen = set()
        try:
            with tarfile.open(archive, mode="r|*") as tar:
                for member in tar:
                    rel = _safe_relative(member.name)
                    if rel.parts:
                        seen.add(rel.parts[0])
                    category, inner = _split_category(rel, todo)
                    if category is None or not inner.parts:
                        continue
                    target = staging / category / inner
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isfile():
                        raise UnsafeArchiveError(
                            f"archive member {member.name!r} is a link or special file; refusing it"
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                    counts[category] += 1
        except (tarfile.TarError, EOFError) as exc:
            raise DatasetError(f"cannot read archive {archive}: {exc}") from exc
        missing = [c for c in todo if counts[c] == 0]
        if missing:
            raise DatasetError(
                f"categories {missing} not found in archive {archive} "
                f"(top-level entries: {', '.join(sorted(seen)) or 'none'})"
            )
        for category in todo:
            payload = {"category": category, "files": counts[category],
                       "archive": archive.name, "source": source}
            install_atomically(staging / category, root / category, payload, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
