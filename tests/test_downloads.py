"""Weight files fetched from the Hugging Face hub on first use (`dd2cli.downloads`), against a loopback hub.

No test reaches the internet: `_Hub` is an `http.server` on 127.0.0.1 that answers `huggingface_hub` the way
huggingface.co does for a file stored with LFS — `HEAD /{repo}/resolve/{revision}/{file}` answers 302 with
`X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size` and a `Location` on another host (the CDN), whose `GET`
serves the bytes. `HF_ENDPOINT` points at it and `HF_HUB_CACHE` at a temporary folder.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dd2cli import DownloadError, Family, MissingWeightsError, Variant, WeightFile, downloads, hookimpl, plugins
from dd2cli.cli import app

REPO = "dd2-tests/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PAYLOAD = b"tiny official weights " * 64
runner = CliRunner()


class _Hub:
    """A loopback stand-in for the hub; `requests` records every request it gets, `mode` breaks it on purpose."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.static: dict[str, bytes] = {}  # plain files by path (a GitHub release, for the Inception weights)
        self.static_short: set[str] = set()  # of those, the ones whose connection breaks halfway
        self.requests: list[tuple[str, str]] = []
        # "ok", "short" (the CDN sends fewer bytes than announced), "drop" (the connection breaks midway) or "404"
        self.mode = "ok"
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet test output
                pass

            def _send(self, data: bytes, body: bool, breaks: bool) -> None:
                """200 announcing all of `data`; with `breaks`, the connection closes after half of it."""
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and breaks:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif body:
                    self.wfile.write(data)

            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                if self.path in hub.static:
                    self._send(hub.static[self.path], body, breaks=self.path in hub.static_short)
                    return
                if self.path.startswith("/cdn/"):
                    data = hub.files[self.path[len("/cdn/"):]]
                    if hub.mode == "short":
                        data = data[: len(data) // 2]
                    self._send(data, body, breaks=hub.mode == "drop")  # drop: breaks halfway, every time
                    return
                prefix = f"/{REPO}/resolve/"
                name = self.path[len(prefix):].split("/", 1)[-1] if self.path.startswith(prefix) else ""
                if hub.mode == "404" or name not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[name]
                self.send_response(302)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", '"pointer"')
                # another host name for the same server, as the hub sends LFS files to its CDN
                self.send_header("Location", f"http://localhost:{hub.port}/cdn/{name}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):  # noqa: N802
                self._answer(body=False)

            def do_GET(self):  # noqa: N802
                self._answer(body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = _Hub({"tiny.bin": PAYLOAD})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("DD2_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("DD2_WEIGHTS_DIR", str(tmp_path / "weights"))
    downloads.set_offline(False)
    yield server
    downloads.set_offline(False)
    server.stop()


def _load(variant, weight_paths, device):
    return {"bytes": Path(weight_paths["w"]).read_bytes(), "path": Path(weight_paths["w"])}


def _variant(**hub_fields) -> Variant:
    fields = {"hf_repo": REPO, "hf_filename": "tiny.bin", "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
              "size": len(PAYLOAD)}
    fields.update(hub_fields)
    return Variant(name="tiny-hub", description="tiny teacher with hub weights", loader=_load,
                   weights=(WeightFile(key="w", filename="tiny_local.bin", description="tiny weights",
                                       url=f"https://example.invalid/{REPO}/tiny.bin", **fields),))


def _blobs(tmp_path: Path) -> list[Path]:
    """The file contents and snapshot entries in the hub cache (not its refs, locks or tags)."""
    return [p for p in (tmp_path / "hub-cache").rglob("*")
            if p.parent.name == "blobs" or "snapshots" in p.parts and not p.is_dir()]


def test_first_use_downloads_then_the_cache_is_used_without_the_server(hub, tmp_path):
    variant = _variant()
    assert variant.weights[0].locate() is None
    teacher = variant.load()
    assert teacher["bytes"] == PAYLOAD
    assert ("GET", "/cdn/tiny.bin") in hub.requests
    assert tmp_path / "hub-cache" in teacher["path"].parents
    hub.stop()
    hub.requests.clear()
    downloads.set_offline(True)  # the cache counts as found, offline or not
    assert variant.load()["bytes"] == PAYLOAD
    downloads.set_offline(False)
    assert variant.load()["bytes"] == PAYLOAD  # the server is gone: no request is needed
    assert hub.requests == []
    assert variant.weights[0].locate() == teacher["path"]


def test_a_file_in_the_weights_folder_is_used_before_the_hub(hub, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "tiny_local.bin").write_bytes(b"local")
    assert _variant().load()["bytes"] == b"local"
    assert hub.requests == []


@pytest.mark.parametrize("how", ["flag", "DD2_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_without_a_cached_copy_is_the_missing_weights_sentence_and_no_request(hub, monkeypatch, how):
    if how == "flag":
        downloads.set_offline(True)
    else:
        monkeypatch.setenv(how, "1")
    with pytest.raises(MissingWeightsError) as info:
        _variant().load()
    message = str(info.value)
    assert not isinstance(info.value, DownloadError)
    assert "\n" not in message and message.endswith(".") and "tiny_local.bin" in message
    assert "--weights w=PATH" in message
    assert hub.requests == []


def test_a_short_download_is_refused_and_leaves_nothing_complete(hub, tmp_path):
    hub.mode = "short"
    with pytest.raises(DownloadError) as info:
        _variant(size=None, sha256="").load()  # huggingface_hub's own size check catches it
    message = str(info.value)
    assert "\n" not in message and "tiny.bin" in message and REPO in message and "--weights w=PATH" in message
    assert "cut short" in message
    assert _blobs(tmp_path) == []  # no partial blob (hf's temporary .incomplete file is removed) and no snapshot
    assert _variant().weights[0].locate() is None  # nothing counts as found afterwards
    hub.mode = "ok"
    assert _variant().load()["bytes"] == PAYLOAD  # and the next run downloads it whole


def test_a_connection_that_breaks_midway_leaves_nothing_complete(hub, tmp_path, monkeypatch):
    import huggingface_hub.file_download as file_download

    monkeypatch.setattr(file_download.time, "sleep", lambda s: None)  # the hub client's pauses between retries
    hub.mode = "drop"
    with pytest.raises(DownloadError, match=r"connection broke.*--weights w=PATH") as info:
        _variant().load()
    assert "\n" not in str(info.value)
    assert sum(1 for method, path in hub.requests if method == "GET") > 1  # it tried to resume
    assert _blobs(tmp_path) == [] and _variant().weights[0].locate() is None
    hub.mode = "ok"
    assert _variant().load()["bytes"] == PAYLOAD


def test_a_wrong_checksum_is_refused_and_the_copy_deleted(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"SHA-256.*deleted.*--weights w=PATH") as info:
        _variant(sha256="0" * 64).load()
    assert "\n" not in str(info.value)
    assert _blobs(tmp_path) == []
    assert _variant(sha256="0" * 64).weights[0].locate() is None


def test_a_wrong_size_is_refused(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"bytes instead of"):
        _variant(size=len(PAYLOAD) + 1, sha256="").load()
    assert _variant().weights[0].locate() is None


def test_a_file_the_hub_does_not_have_is_one_sentence(hub):
    hub.mode = "404"
    with pytest.raises(DownloadError) as info:
        _variant().load()
    message = str(info.value)
    assert "\n" not in message and "404" in message and REPO in message and "--weights w=PATH" in message


def test_a_server_that_is_down_fails_within_seconds(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"could not be reached.*--weights w=PATH") as info:
        _variant().load()
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value)


def test_an_explicit_path_that_does_not_exist_is_never_downloaded(hub, tmp_path):
    with pytest.raises(MissingWeightsError):
        _variant().load(weights={"w": tmp_path / "nowhere.bin"})
    assert hub.requests == []


class _TinyHubPlugin:
    @hookimpl
    def dd2_register_teachers(self, register):
        register(Family(name="tinyhub", description="tiny family with hub weights", variants=(_variant(),)))


def test_teachers_says_download_on_first_use_then_cached(hub):
    plugins.register_plugin(_TinyHubPlugin(), name="tinyhub")
    res = runner.invoke(app, ["teachers", "tiny-hub", "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)["teachers"]
    (entry,) = row["weights"]
    assert entry["status"] == "download" and entry["hf_repo"] == REPO and not row["ready"]
    assert "fetched from the Hugging Face hub" in runner.invoke(app, ["teachers", "tiny-hub"]).output
    off = json.loads(runner.invoke(app, ["--offline", "teachers", "tiny-hub", "--json"]).output)
    assert off["teachers"][0]["weights"][0]["status"] == "missing"
    _variant().load()
    (entry,) = json.loads(runner.invoke(app, ["teachers", "tiny-hub", "--json"]).output)["teachers"][0]["weights"]
    assert entry["status"] == "cached" and entry["path"]


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_distill_offline_without_files_is_one_sentence(hub, tmp_path, where):
    import dd2_var
    from dd2cli.downloads import is_offline

    plugins.register_plugin(dd2_var, name="var")
    args = ["distill", "--teacher", "var-d16", "--out", str(tmp_path / "run")]
    args = ["--offline", *args] if where == "before the command" else [*args, "--offline"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split())
    assert "var_d16.pth" in message and "--weights var=PATH" in message and "huggingface.co/FoundationVision/var" in message
    assert hub.requests == []
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    assert not is_offline()  # the flag held for that command only


# The Inception weights of `dd2 eval`: torch.hub's download, checked against the hash prefix in the file name.

INCEPTION_BYTES = b"not really inception " * 100


@pytest.fixture
def inception_home(hub, monkeypatch, tmp_path):
    from dd2cli.engine.features import INCEPTION_FILENAME

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    prefix = hashlib.sha256(INCEPTION_BYTES).hexdigest()[:8]
    hub.static[f"/release/weights-test-{prefix}.pth"] = INCEPTION_BYTES
    hub.static["/release/weights-test-00000000.pth"] = INCEPTION_BYTES
    monkeypatch.setenv("DD2_INCEPTION_URL", f"{hub.url}/release/weights-test-{prefix}.pth")
    return tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILENAME


def test_inception_weights_are_downloaded_once_into_torch_home(hub, inception_home):
    from dd2cli.engine.features import locate_inception_weights

    assert locate_inception_weights() == inception_home
    assert inception_home.read_bytes() == INCEPTION_BYTES
    hub.requests.clear()
    assert locate_inception_weights() == inception_home
    assert hub.requests == []


def test_inception_weights_with_a_wrong_hash_are_refused(hub, inception_home, monkeypatch):
    from dd2cli.engine.features import locate_inception_weights

    monkeypatch.setenv("DD2_INCEPTION_URL", f"{hub.url}/release/weights-test-00000000.pth")
    with pytest.raises(DownloadError, match=r"SHA-256.*--inception-weights PATH") as info:
        locate_inception_weights()
    assert "\n" not in str(info.value)
    assert not inception_home.exists() and list(inception_home.parent.iterdir()) == []  # no .partial file either


def test_inception_weights_offline_or_server_down(hub, inception_home, monkeypatch):
    from dd2cli import DD2Error
    from dd2cli.engine.features import locate_inception_weights

    downloads.set_offline(True)
    with pytest.raises(DD2Error, match=r"never downloads them offline.*--inception-weights PATH"):
        locate_inception_weights()
    assert hub.requests == []
    downloads.set_offline(False)
    monkeypatch.setenv("DD2_INCEPTION_URL", f"http://127.0.0.1:{_closed_port()}/weights-test-00000000.pth")
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"could not be reached"):
        locate_inception_weights()
    assert time.monotonic() - start < 10 and not inception_home.exists()


# Named ADM references of `dd2 eval --ref imagenet256|imagenet512`: downloaded once into the cache folder.


def _tiny_adm_npz() -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(4), sigma=np.eye(4))
    return buf.getvalue()


@pytest.fixture
def adm_refs(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("DD2_CACHE_DIR", str(tmp_path / "dd2-cache"))
    monkeypatch.setenv("DD2_ADM_REFERENCES_URL", f"{hub.url}/ref_batches")
    data = _tiny_adm_npz()
    hub.static["/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"] = data
    return tmp_path / "dd2-cache" / "refs", data


def test_a_named_reference_is_downloaded_once_and_opened(hub, adm_refs, monkeypatch, tmp_path):
    from dd2cli.engine.evaluate import open_reference

    folder, data = adm_refs
    monkeypatch.chdir(tmp_path)
    ref = open_reference("imagenet256", "inception", None)
    assert ref.name == "VIRTUAL_imagenet256_labeled.npz" and set(ref.stats) == {"mu", "sigma"}
    assert (folder / "VIRTUAL_imagenet256_labeled.npz").read_bytes() == data
    hub.requests.clear()
    open_reference("imagenet256", "inception", None)
    assert hub.requests == []


def test_a_named_reference_cut_short_or_offline_leaves_nothing(hub, adm_refs, monkeypatch, tmp_path):
    from dd2cli import DD2Error
    from dd2cli.engine.evaluate import open_reference

    folder, data = adm_refs
    monkeypatch.chdir(tmp_path)
    hub.static["/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz"] = data
    hub.static_short = {"/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz"}
    with pytest.raises(DownloadError, match=r"cut short.*--ref PATH") as info:
        open_reference("imagenet512", "inception", None)
    assert "\n" not in str(info.value) and list(folder.iterdir()) == []
    hub.requests.clear()
    downloads.set_offline(True)
    with pytest.raises(DD2Error, match=r"never downloads offline.*--ref PATH"):
        open_reference("imagenet256", "inception", None)
    assert hub.requests == [] and list(folder.iterdir()) == []
