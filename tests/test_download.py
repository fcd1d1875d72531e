"""MVTec AD download: real HTTP transfers from a local server, resume, checksums, atomic extraction."""
from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import pytest
from PIL import Image

from altub_fast.data import (
    COMPLETE_MARKER,
    MVTEC_SHA256,
    MVTEC_URL,
    ChecksumError,
    DatasetError,
    DownloadError,
    MVTecAD,
    UnsafeArchiveError,
    download_category,
    download_file,
    download_mvtec,
    extract_categories,
    is_complete,
)

FAST = dict(progress=False, backoff=0.0, timeout=5.0, chunk_size=4096)


def _png(seed: int, mask: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if mask:
        arr = np.zeros((32, 32), np.uint8)
        arr[8:16, 8:20] = 255
    else:
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar_xz(files: Dict[str, bytes], links: Optional[Dict[str, str]] = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _mvtec_files(prefix: str = "") -> Dict[str, bytes]:
    files = {f"{prefix}license.txt": b"CC BY-NC-SA 4.0"}
    for k, cat in enumerate(("bottle", "carpet")):
        files[f"{prefix}{cat}/train/good/000.png"] = _png(10 * k)
        files[f"{prefix}{cat}/train/good/001.png"] = _png(10 * k + 1)
        files[f"{prefix}{cat}/test/good/000.png"] = _png(10 * k + 2)
        files[f"{prefix}{cat}/test/cut/000.png"] = _png(10 * k + 3)
        files[f"{prefix}{cat}/ground_truth/cut/000_mask.png"] = _png(0, mask=True)
    return files


ARCHIVE = _tar_xz(_mvtec_files())
DIGEST = hashlib.sha256(ARCHIVE).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.payload`` at any path but /missing; ``server.mode`` picks a misbehaviour."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append(self.headers.get("Range"))
            first = len(srv.requests) == 1
        if self.path == "/missing":
            self.send_error(404)
            return
        data, mode, header = srv.payload, srv.mode, self.headers.get("Range")
        start = 0
        if header and mode != "ignore_range":
            start = int(header[len("bytes="):].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if (mode == "cut_once" and first) or mode == "always_cut":
            self.wfile.write(body[: srv.cut_at])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "stall_once" and first:
            self.wfile.write(body[: srv.cut_at])
            self.wfile.flush()
            time.sleep(1.0)  # longer than the client's timeout
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    payload: bytes = ARCHIVE
    mode: str = "normal"
    cut_at: int = len(ARCHIVE) // 3

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: List[Optional[str]] = []
        self.timeout = 5

    def url(self, name: str = "mvtec_anomaly_detection.tar.xz") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _nothing_complete_or_temporary(root: Path) -> None:
    entries = [p.name for p in root.iterdir()] if root.exists() else []
    assert not any(name.startswith((".tmp", ".trash")) for name in entries), entries
    assert not any(is_complete(root / name) for name in entries)


def test_spec_constants() -> None:
    assert MVTEC_URL.startswith("https://www.mydrive.ch/") and MVTEC_URL.endswith("mvtec_anomaly_detection.tar.xz")
    assert MVTEC_SHA256.startswith("cf4313b1") and len(MVTEC_SHA256) == 64


def test_download_one_category(tmp_path: Path, server: _Server, capsys) -> None:
    out = download_category(tmp_path, "carpet", url=server.url(), sha256=DIGEST, **FAST)
    assert out == tmp_path / "carpet" and is_complete(out)
    assert not (tmp_path / "bottle").exists()  # only the asked category is extracted
    assert (tmp_path / ".downloads/mvtec_anomaly_detection.tar.xz").read_bytes() == ARCHIVE
    assert (out / "test/cut/000.png").read_bytes() == _mvtec_files()["carpet/test/cut/000.png"]
    assert "CC BY-NC-SA 4.0" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    ds = MVTecAD(tmp_path, "carpet", "test", image_size=16)
    assert ds.labels == [0, 1] and ds[1]["mask"].sum() > 0

    # a second category comes from the cached archive, without a request
    n_requests = len(server.requests)
    download_category(tmp_path, "bottle", url=server.url(), sha256=DIGEST, **FAST)
    assert is_complete(tmp_path / "bottle") and len(server.requests) == n_requests


def test_complete_category_not_downloaded_again(tmp_path: Path, server: _Server, capsys) -> None:
    download_category(tmp_path, "carpet", url=server.url(), sha256=DIGEST, keep_archive=False, **FAST)
    assert not (tmp_path / ".downloads/mvtec_anomaly_detection.tar.xz").exists()
    capsys.readouterr()
    n_requests = len(server.requests)
    # even an unreachable address is fine: nothing is fetched
    out = download_category(tmp_path, "carpet", url="http://127.0.0.1:9/x.tar.xz", sha256=DIGEST, **FAST)
    assert is_complete(out) and len(server.requests) == n_requests
    assert capsys.readouterr().err == ""


def test_resume_after_broken_connection(tmp_path: Path, server: _Server) -> None:
    server.mode = "cut_once"
    dest = download_file(server.url(), tmp_path / "a.tar.xz", DIGEST, **FAST)
    assert dest.read_bytes() == ARCHIVE and not (tmp_path / "a.tar.xz.part").exists()
    assert server.requests == [None, f"bytes={server.cut_at}-"]


def test_resume_after_stalled_connection(tmp_path: Path, server: _Server) -> None:
    server.mode = "stall_once"
    fast = dict(FAST, timeout=0.3)
    dest = download_file(server.url(), tmp_path / "a.tar.xz", DIGEST, **fast)
    assert dest.read_bytes() == ARCHIVE
    # resumes from what reached the disk: whole chunks before the stall
    assert len(server.requests) == 2 and server.requests[0] is None
    assert 0 < int(server.requests[1][len("bytes="):-1]) <= server.cut_at


def test_server_ignoring_range_restarts(tmp_path: Path, server: _Server) -> None:
    server.mode = "ignore_range"
    (tmp_path / "a.tar.xz.part").write_bytes(b"stale bytes from another file" * 10)
    dest = download_file(server.url(), tmp_path / "a.tar.xz", DIGEST, **FAST)
    assert dest.read_bytes() == ARCHIVE
    assert server.requests == ["bytes=290-"]


def test_part_already_complete(tmp_path: Path, server: _Server) -> None:
    (tmp_path / "a.tar.xz.part").write_bytes(ARCHIVE)
    dest = download_file(server.url(), tmp_path / "a.tar.xz", DIGEST, **FAST)
    assert dest.read_bytes() == ARCHIVE and server.requests == [f"bytes={len(ARCHIVE)}-"]


def test_attempts_are_bounded(tmp_path: Path, server: _Server) -> None:
    server.mode, server.cut_at = "always_cut", 1000
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        download_file(server.url(), tmp_path / "a.tar.xz", DIGEST, max_attempts=3, **FAST)
    assert len(server.requests) == 3
    assert (tmp_path / "a.tar.xz.part").stat().st_size == 3000  # kept for the next call
    assert not (tmp_path / "a.tar.xz").exists()


def test_http_error_is_not_retried(tmp_path: Path, server: _Server) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url("missing"), tmp_path / "a", None, **FAST)
    assert len(server.requests) == 1


def test_checksum_mismatch(tmp_path: Path, server: _Server) -> None:
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=f"expected {wrong}, got {DIGEST}"):
        download_category(tmp_path, "carpet", url=server.url(), sha256=wrong, **FAST)
    assert list((tmp_path / ".downloads").iterdir()) == []  # neither the file nor a .part
    assert not (tmp_path / "carpet").exists()
    _nothing_complete_or_temporary(tmp_path)


def test_corrupted_archive(tmp_path: Path, server: _Server) -> None:
    damaged = bytearray(ARCHIVE)
    damaged[len(damaged) // 2] ^= 0xFF
    server.payload = bytes(damaged)
    with pytest.raises(ChecksumError, match="expected " + DIGEST):
        download_mvtec(tmp_path, url=server.url(), sha256=DIGEST, **FAST)
    _nothing_complete_or_temporary(tmp_path)
    # a damaged cached archive is fetched again, not trusted
    (tmp_path / ".downloads").mkdir(exist_ok=True)
    (tmp_path / ".downloads/mvtec_anomaly_detection.tar.xz").write_bytes(bytes(damaged))
    server.payload = ARCHIVE
    out = download_mvtec(tmp_path, ["bottle", "carpet"], url=server.url(), sha256=DIGEST, **FAST)
    assert all(is_complete(p) for p in out.values())


def test_missing_category(tmp_path: Path, server: _Server) -> None:
    with pytest.raises(DatasetError, match=r"\['zipper'\] not found.*bottle, carpet, license.txt"):
        download_category(tmp_path, "zipper", url=server.url(), sha256=DIGEST, **FAST)
    _nothing_complete_or_temporary(tmp_path)


def test_existing_unmarked_folder_needs_overwrite(tmp_path: Path, server: _Server) -> None:
    (tmp_path / "carpet").mkdir()
    (tmp_path / "carpet/mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match="overwrite=True"):
        download_category(tmp_path, "carpet", url=server.url(), sha256=DIGEST, **FAST)
    assert (tmp_path / "carpet/mine.txt").exists()
    download_category(tmp_path, "carpet", url=server.url(), sha256=DIGEST, overwrite=True, **FAST)
    assert is_complete(tmp_path / "carpet") and not (tmp_path / "carpet/mine.txt").exists()
    _nothing_complete_or_temporary(tmp_path / "carpet")


def test_extract_with_wrapper_folder(tmp_path: Path) -> None:
    archive = tmp_path / "w.tar.xz"
    archive.write_bytes(_tar_xz(_mvtec_files("mvtec_anomaly_detection/")))
    out = extract_categories(archive, tmp_path / "data", ["carpet"])
    assert (out["carpet"] / "train/good/001.png").is_file() and (out["carpet"] / COMPLETE_MARKER).is_file()


@pytest.mark.parametrize("files,links", [
    ({"carpet/../../evil.txt": b"x"}, None),
    ({"/abs/carpet/evil.txt": b"x"}, None),
    ({"carpet/train/good/0.png": b"x"}, {"carpet/train/good/1.png": "/etc/passwd"}),
])
def test_unsafe_members_rejected(tmp_path: Path, files, links) -> None:
    archive = tmp_path / "bad.tar.xz"
    archive.write_bytes(_tar_xz(files, links))
    root = tmp_path / "data"
    with pytest.raises(UnsafeArchiveError):
        extract_categories(archive, root, ["carpet"])
    assert not (tmp_path / "evil.txt").exists() and not (root / "carpet").exists()
    _nothing_complete_or_temporary(root)
