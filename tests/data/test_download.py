"""download() against a real HTTP server on 127.0.0.1 (threaded, with Range support)."""
import argparse
import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import cli
from harness.data import download as dl
from harness.data.check import check_dataset
from harness.data.download import ARCHIVE_NAME, METADATA_FILES, DownloadError, download
from harness.data.fingerprint import DOWNLOAD_RECORD
from harness.data.synth import METADATA_FILE

BASE = "ADEChallengeData2016"


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def archive(synth_root):
    """A zip of the generated dataset laid out as the official one: its directory entries,
    images and annotations, and its two metadata files (not the generator's own record)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.write(synth_root / BASE, BASE)
        for p in sorted((synth_root / BASE).rglob("*")):
            if p.name != METADATA_FILE:
                zf.write(p, p.relative_to(synth_root).as_posix())
        for name in METADATA_FILES:
            zf.writestr(name, "metadata\n")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        if self.path != "/" + ARCHIVE_NAME:
            self.send_error(404)
            return
        data = srv.data
        rng = None if srv.ignore_range else self.headers.get("Range")
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if start >= len(data) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if srv.drops:
            # Send part of the body, then hang up: the client sees a short read.
            self.wfile.write(body[:srv.drops.pop(0)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(archive):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.data, srv.ranges, srv.drops, srv.ignore_range = archive, [], [], False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/{ARCHIVE_NAME}"
    yield srv
    srv.shutdown()
    srv.server_close()


def sha1(data):
    return hashlib.sha1(data).hexdigest()


def fetch(root, srv, digest, **kw):
    return download(root, srv.url, digest, progress=False, chunk_size=4096, retry_wait=0, **kw)


def leftovers(root):
    return sorted(p.name for p in root.iterdir())


def assert_nothing_complete(root):
    assert not (root / BASE).exists()
    assert not (root / ARCHIVE_NAME).exists()
    assert not any(p.name.startswith(f".{BASE}.extract-") for p in root.iterdir())


def test_good_archive(tmp_path, server, archive):
    out = fetch(tmp_path, server, sha1(archive))
    assert out == tmp_path / BASE
    assert check_dataset(out, progress=False) == []
    # the archive's metadata files skipped; the record of the archive it came from written
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "images", DOWNLOAD_RECORD]
    assert json.loads((out / DOWNLOAD_RECORD).read_text())["archive_sha1"] == sha1(archive)
    assert leftovers(tmp_path) == [BASE]  # no .part, no zip, no temp dir
    assert server.ranges == [None]
    # Already complete: nothing is fetched again; the dataset dir itself is accepted as root.
    assert fetch(tmp_path / BASE, server, sha1(archive)) == out
    assert server.ranges == [None]


def test_keep_archive(tmp_path, server, archive):
    fetch(tmp_path, server, sha1(archive), keep_archive=True)
    assert leftovers(tmp_path) == [BASE, ARCHIVE_NAME]
    assert (tmp_path / ARCHIVE_NAME).read_bytes() == archive


def test_wrong_checksum_moves_download_aside_and_next_run_starts_afresh(tmp_path, server, archive):
    with pytest.raises(DownloadError, match="SHA-1"):
        fetch(tmp_path, server, "0" * 40)
    assert_nothing_complete(tmp_path)
    assert leftovers(tmp_path) == [ARCHIVE_NAME + ".bad"]
    fetch(tmp_path, server, sha1(archive))
    assert server.ranges == [None, None]  # the bad bytes were not resumed
    assert check_dataset(tmp_path, progress=False) == []


def test_truncated_archive(tmp_path, server, archive):
    server.data = archive[: len(archive) // 2]
    with pytest.raises(DownloadError, match="SHA-1"):
        fetch(tmp_path, server, sha1(archive))
    assert_nothing_complete(tmp_path)
    # Even when the checksum given matches the truncated bytes, extraction fails cleanly.
    with pytest.raises(DownloadError, match="not a valid zip"):
        fetch(tmp_path / "other", server, sha1(server.data))
    assert not (tmp_path / "other" / BASE).exists()
    assert not any(p.name.startswith(f".{BASE}.extract-") for p in (tmp_path / "other").iterdir())


def test_archive_without_dataset_files(tmp_path, server):
    server.data = _zip({f"{BASE}/": b"", METADATA_FILES[0]: b"x"})
    with pytest.raises(DownloadError, match=f"no files under {BASE}/"):
        fetch(tmp_path, server, sha1(server.data))
    assert not (tmp_path / BASE).exists()


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", f"{BASE}/../evil.txt",
                                    f"{BASE}/images/training/../../../evil.txt", f"{BASE}/other/x.png",
                                    f"{BASE}/images/x.jpg", f"{BASE}/images/training/sub/x.jpg", "other/"])
def test_a_member_outside_the_layout_refuses_the_archive(tmp_path, server, archive, capsys, member):
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    server.data = _zip({**members, member: b"x"})
    assert cli.main(["data", "download", "--root", str(tmp_path), "--url", server.url,
                     "--sha1", sha1(server.data)]) == 2
    stderr = capsys.readouterr().err  # the download's progress bar, then one message
    err = stderr.splitlines()[-1]
    assert err.startswith("segrepro data download:") and repr(member) in err and ARCHIVE_NAME in err
    assert "Traceback" not in stderr
    # refused before writing anything: no dataset, no extraction directory, nothing outside
    assert leftovers(tmp_path) == [ARCHIVE_NAME]
    assert not (tmp_path.parent / "evil.txt").exists() and not list(tmp_path.rglob("evil.txt"))


def test_drop_mid_transfer_leaves_resumable_part_then_resumes(tmp_path, server, archive):
    cut = len(archive) // 3
    server.drops = [cut]
    with pytest.raises(DownloadError, match="resume"):
        fetch(tmp_path, server, sha1(archive), retries=0)
    assert_nothing_complete(tmp_path)
    part = tmp_path / (ARCHIVE_NAME + ".part")
    assert part.read_bytes() == archive[:cut]
    fetch(tmp_path, server, sha1(archive))
    assert server.ranges == [None, f"bytes={cut}-"]
    assert check_dataset(tmp_path, progress=False) == []
    assert leftovers(tmp_path) == [BASE]


def test_drops_are_retried_within_one_call(tmp_path, server, archive):
    server.drops = [5000, 20000]
    fetch(tmp_path, server, sha1(archive), retries=2)
    assert server.ranges == [None, "bytes=5000-", "bytes=25000-"]
    assert check_dataset(tmp_path, progress=False) == []


def test_server_ignoring_range_restarts(tmp_path, server, archive):
    (tmp_path / (ARCHIVE_NAME + ".part")).write_bytes(b"stale bytes from elsewhere")
    server.ignore_range = True
    fetch(tmp_path, server, sha1(archive))
    assert check_dataset(tmp_path, progress=False) == []


def test_complete_part_is_not_fetched_again(tmp_path, server, archive):
    (tmp_path / (ARCHIVE_NAME + ".part")).write_bytes(archive)
    fetch(tmp_path, server, sha1(archive))
    assert server.ranges == [f"bytes={len(archive)}-"]  # answered 416: nothing left to fetch
    assert check_dataset(tmp_path, progress=False) == []


def test_a_refused_transfer_names_no_part_file(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="nothing received") as e:
        download(tmp_path, f"http://127.0.0.1:{port}/a.zip", "0" * 40, retries=0, progress=False)
    assert ".part" not in str(e.value) and not list(tmp_path.glob("*.part"))


def test_http_error_and_bad_arguments(tmp_path, server, archive, capsys):
    with pytest.raises(DownloadError, match="404"):
        download(tmp_path, server.url + ".missing", sha1(archive), progress=False)
    p = argparse.ArgumentParser()
    dl.add_arguments(p)
    assert dl.run(p.parse_args(["--root", str(tmp_path), "--url", server.url, "--sha1", "xyz"])) == 2
    assert "--sha1 'xyz'" in capsys.readouterr().err
    assert dl.run(p.parse_args(["--root", str(tmp_path), "--url", "ftp://x/y.zip"])) == 2
    assert dl.run(p.parse_args(["--root", str(tmp_path), "--url", server.url, "--sha1", sha1(archive)])) == 0
    assert check_dataset(tmp_path, progress=False) == []
