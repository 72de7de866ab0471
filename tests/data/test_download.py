"""Downloads against a local HTTP server: md5 checked, nothing partial left behind."""

import functools
import hashlib
import http.server
import threading

import pytest

from metatransfer.data.download import MIRROR_ENV, download_benchmark, download_file
from metatransfer.data.prepare import prepare_dataset

PAYLOAD = b"few-shot fixture bytes\n" * 1000


@pytest.fixture
def server(tmp_path):
    """Serve `tmp_path/served` on 127.0.0.1 from a thread; yields the base URL."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "fixture.bin").write_bytes(PAYLOAD)
    (served / "images_background.zip").write_bytes(PAYLOAD)
    (served / "cifar-100-python.tar.gz").write_bytes(PAYLOAD)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _quiet(message):
    pass


def test_good_md5_keeps_the_file(server, tmp_path):
    dest = tmp_path / "downloads" / "fixture.bin"
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    assert download_file(f"{server}/fixture.bin", dest, md5, log=_quiet) == dest
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["fixture.bin"]


def test_existing_file_with_good_md5_is_reused(server, tmp_path):
    dest = tmp_path / "fixture.bin"
    dest.write_bytes(PAYLOAD)
    messages = []
    download_file(
        "http://127.0.0.1:9/never", dest, hashlib.md5(PAYLOAD).hexdigest(), log=messages.append
    )
    assert "already downloaded" in messages[0]


def test_wrong_md5_deletes_the_file(server, tmp_path):
    dest = tmp_path / "downloads" / "fixture.bin"
    with pytest.raises(
        ValueError, match=r"md5 mismatch for .*fixture.bin: got [0-9a-f]{32}, expected 0{32}"
    ):
        download_file(f"{server}/fixture.bin", dest, "0" * 32, log=_quiet)
    assert list(dest.parent.iterdir()) == []


def test_missing_url_raises_oserror_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "downloads" / "absent.bin"
    with pytest.raises(OSError, match="Could not download"):
        download_file(f"{server}/absent.bin", dest, "0" * 32, log=_quiet)
    assert list(dest.parent.iterdir()) == []


def test_mirror_from_environment_is_used(server, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, server)
    # The fixture is not the real Omniglot zip, so the canonical md5 must reject it.
    with pytest.raises(ValueError, match=f"md5 mismatch for {server}/images_background.zip"):
        download_benchmark("omniglot", tmp_path / "downloads", log=_quiet)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_no_download_for_imagenet_benchmarks(tmp_path):
    with pytest.raises(ValueError, match="No download for 'miniimagenet'"):
        download_benchmark("miniimagenet", tmp_path, log=_quiet)


def test_prepare_with_download_fails_cleanly_on_md5_mismatch(server, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, server)
    with pytest.raises(ValueError, match="md5 mismatch"):
        prepare_dataset("fc100", None, tmp_path, download=True, log=_quiet)
    assert not (tmp_path / "fc100").exists()
    assert list((tmp_path / "downloads").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_rejects_source_and_download_together(tmp_path):
    with pytest.raises(ValueError, match="either a source or download=True"):
        prepare_dataset("omniglot", tmp_path, tmp_path, download=True, log=_quiet)
