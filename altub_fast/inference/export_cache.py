"""Exported graphs cached beside the checkpoint they come from, keyed by what makes them differ.

    key = ExportKey.for_model(model, "last.pt", "onnxruntime", (256, 256))
    path, cached = get_export(key, "last.pt", build=lambda folder: write_files(folder))

An entry is a folder ``<checkpoint>.exports/<runtime>-<version>-<H>x<W>-<digest>/`` holding the
exported files and ``manifest.json``: the whole key (the checkpoint file's SHA-256, the input size,
the runtime and its version, the exporting torch and opset, the model's scoring rules, which eval's
``--score`` / ``--image-score`` can change, and the form of the graph, ``graph.GRAPH_VERSION``) and
the SHA-256 of every file. An entry is used only when its manifest parses, its key equals the one
asked for and every file's hash matches; anything else (a truncated or edited file, a half-written
folder, an entry of an older graph form) is deleted and rebuilt, never trusted.

Builds go to a temporary folder that is renamed into place once complete, so a crash or a second
process never leaves a half-written entry under the final name. After a build the entries of other
contents of the same checkpoint file (stale: the file changed) are removed. Where the checkpoint's
folder is not writable the cache is under ``$ALTUB_FAST_CACHE/exports`` (default
``~/.cache/altub_fast``), one folder per checkpoint path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

__all__ = ["ExportKey", "file_digest", "cache_dir_for", "get_export", "load_entry", "MANIFEST"]

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def file_digest(path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ExportKey:
    """What an exported graph depends on; equal keys give interchangeable exports."""
    checkpoint_sha256: str
    image_size: Tuple[int, int]
    runtime: str
    runtime_version: str
    torch: str
    opset: int
    rules: Tuple[Tuple[str, str], ...]      # the model's scoring rules, as (name, value) pairs
    graph: int = 1                          # the form of the exported graph (graph.GRAPH_VERSION)

    @classmethod
    def for_model(cls, model, checkpoint, runtime: str, runtime_version: str, image_size: Sequence[int],
                  opset: int, digest: Optional[str] = None) -> "ExportKey":
        """The key of ``model`` (loaded from, and identical to, ``checkpoint``) exported for
        ``runtime`` at ``image_size``; ``digest``: the checkpoint's SHA-256 if already known."""
        import torch

        from .graph import GRAPH_VERSION

        scorer = getattr(model, "scorer", None)
        rules = {} if scorer is None else {k: str(v) for k, v in scorer.description.items() if k != "calibrated"}
        return cls(digest or file_digest(checkpoint), (int(image_size[0]), int(image_size[1])), runtime,
                   runtime_version, torch.__version__, int(opset), tuple(sorted(rules.items())), GRAPH_VERSION)

    def name(self) -> str:
        rest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        h, w = self.image_size
        return f"{self.runtime}-{self.runtime_version}-{h}x{w}-{self.checkpoint_sha256[:16]}-{rest}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["rules"] = dict(self.rules)
        return d


def _fallback_root(checkpoint) -> Path:
    """``$ALTUB_FAST_CACHE/exports/<name>-<hash of its absolute path>.exports``: one folder per
    checkpoint path, as beside it (two ``last.pt`` of different runs do not share one)."""
    base = Path(os.environ.get("ALTUB_FAST_CACHE", Path.home() / ".cache" / "altub_fast"))
    where = hashlib.sha256(str(Path(checkpoint).resolve()).encode()).hexdigest()[:12]
    return base / "exports" / f"{Path(checkpoint).name}-{where}.exports"


def cache_dir_for(checkpoint) -> Path:
    """``<checkpoint>.exports`` when it can be created, else the user cache (module docstring)."""
    beside = Path(str(checkpoint) + ".exports")
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    root = _fallback_root(checkpoint)
    root.mkdir(parents=True, exist_ok=True)
    return root


def load_entry(folder: Path, key: ExportKey) -> Optional[Path]:
    """The model file of a complete, intact entry for ``key``, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("key") != key.to_dict():
            return None
        files = manifest["files"]
        if not files or any(file_digest(folder / name) != digest for name, digest in files.items()):
            return None
        model = folder / manifest["model"]
        return model if model.is_file() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _prune_stale(root: Path, key: ExportKey, keep: Path) -> None:
    """Remove the entries written from other contents of the same checkpoint file."""
    for entry in root.iterdir():
        if entry == keep or not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            old = json.loads((entry / MANIFEST).read_text())["key"]["checkpoint_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue   # not an entry of ours (or being written): left alone
        if old != key.checkpoint_sha256:
            _remove(entry)


def get_export(key: ExportKey, checkpoint, build: Callable[[Path], Path], rebuild: bool = False) -> Tuple[Path, bool]:
    """(the model file for ``key``, True when it came from the cache). ``build(folder)`` writes
    the export into an empty folder and returns its model file. ``rebuild``: ignore a cached entry
    (one that failed its check against PyTorch)."""
    root = cache_dir_for(checkpoint)
    final = root / key.name()
    if not rebuild:
        found = load_entry(final, key)
        if found is not None:
            return found, True
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key.runtime}-", dir=root))
    try:
        model = build(tmp)
        files = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"key": key.to_dict(), "model": model.name, "files": files, "checkpoint": str(checkpoint)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            other = None if rebuild else load_entry(final, key)
            if other is not None:   # another process finished the same entry meanwhile: use theirs
                return other, True
            _remove(final)
        try:
            os.replace(tmp, final)
        except OSError:   # another process put a complete entry there first
            found = load_entry(final, key)
            if found is None:
                raise
            return found, True
    finally:
        if tmp.exists():
            _remove(tmp)
    _prune_stale(root, key, final)
    return final / model.name, False
