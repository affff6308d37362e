"""download(): checksum verification and extraction, offline (loopback HTTP server and file:// URLs)."""

import contextlib
import functools
import hashlib
import http.server
import threading
import zipfile

import numpy as np
import pytest

from recjax.data.download import PUBLISHED_MD5, ChecksumError, download
from recjax.data.movielens import load_ml100k


def _tiny_ml100k_zip(path, rng):
    users = rng.integers(1, 4, size=12)
    items = rng.permutation(np.arange(1, 13))
    rows = "".join(
        f"{u}\t{i}\t{rng.integers(1, 6)}\t{880000000 + k}\n"
        for k, (u, i) in enumerate(zip(users, items, strict=True))
    )
    flags = "|".join(["0"] * 5 + ["1"] + ["0"] * 13)
    item_rows = "".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|{flags}\n" for i in range(1, 13))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ml-100k/u.data", rows)
        z.writestr("ml-100k/u.item", item_rows)
        z.writestr("ml-100k/u.user", "1|24|M|writer|1\n2|53|F|other|2\n3|23|M|student|3\n")
        z.writestr("ml-100k/u.occupation", "other\nstudent\nwriter\n")
    return path.read_bytes()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(directory):
    server = http.server.HTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory))
    )
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_loopback_checksums(tmp_path, rng):
    served = tmp_path / "served"
    served.mkdir()
    data = _tiny_ml100k_zip(served / "ml-100k.zip", rng)
    sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    with _serve(served) as base:
        out = download("ml-100k", tmp_path / "a", url=f"{base}/ml-100k.zip", checksum=f"sha256:{sha}")
        assert out == tmp_path / "a" / "ml-100k" and (out / "u.data").is_file()
        ds = load_ml100k(tmp_path / "a")
        assert ds.num_interactions == 12 and ds.num_items == 12
        out = download("ml-100k", tmp_path / "b", url=f"{base}/ml-100k.zip", checksum=md5)  # bare MD5
        assert (out / "u.item").is_file()
        wrong = "0" * 64
        with pytest.raises(ChecksumError, match=rf"expected sha256 {wrong}, got {sha}.*removed"):
            download("ml-100k", tmp_path / "c", url=f"{base}/ml-100k.zip", checksum=wrong)
        assert list((tmp_path / "c").iterdir()) == []  # nothing partial left behind
        # the published MD5 of the real archive does not match this tiny one
        with pytest.raises(ChecksumError, match=PUBLISHED_MD5["ml-100k"]):
            download("ml-100k", tmp_path / "d", url=f"{base}/ml-100k.zip")
        with pytest.raises(OSError, match="download of ml-100k from .*missing.zip failed"):
            download("ml-100k", tmp_path / "e", url=f"{base}/missing.zip", checksum=md5)
        assert list((tmp_path / "e").iterdir()) == []


def test_download_file_url_and_reuse(tmp_path, rng):
    data = _tiny_ml100k_zip(tmp_path / "src.zip", rng)
    sha = hashlib.sha256(data).hexdigest()
    out = download("ml-100k", tmp_path / "x", url=(tmp_path / "src.zip").as_uri(), checksum=sha)
    assert (out / "u.data").read_bytes() == zipfile.ZipFile(tmp_path / "src.zip").read("ml-100k/u.data")
    (tmp_path / "src.zip").unlink()  # a verified archive already in dest_dir is reused, not fetched again
    assert download("ml-100k", tmp_path / "x", url="file:///nonexistent.zip", checksum=sha) == out


def test_download_bad_arguments_and_unsafe_zip(tmp_path):
    with pytest.raises(ValueError, match=r"name: expected one of \['ml-100k', 'ml-1m'\], got 'ml-20m'"):
        download("ml-20m", tmp_path)
    with pytest.raises(ValueError, match="checksum: expected 'sha256:<64 hex>'"):
        download("ml-1m", tmp_path, checksum="sha256:1234")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="would extract outside"):
        download("ml-1m", tmp_path / "y", url=evil.as_uri(), checksum=sha)
    assert not (tmp_path / "outside.txt").exists()
