"""Official weight files fetched from the Hugging Face hub on first use.

A `WeightFile` with hub coordinates (`hf_repo`, `hf_filename`, `revision`) that is found nowhere else is
downloaded with `huggingface_hub.hf_hub_download` into the standard hub cache (`$HF_HUB_CACHE`, else
`$HF_HOME/hub`, else `~/.cache/huggingface/hub`; `$HF_ENDPOINT` names another server). The download shows
the hub's progress bar, writes to a temporary file that is renamed only when complete, and is checked
against the file's `size` and `sha256` when they are known. A file already in that cache counts as found
and is looked up without importing `huggingface_hub` (this module imports it only to download).

`download_url` fetches a plain URL (the ADM reference batches of `dd2 eval --ref imagenet256`) the same way:
a temporary file, checked against the announced and the expected size, renamed into place only when complete.

Offline mode (`dd2 --offline`, `DD2_OFFLINE=1` or `HF_HUB_OFFLINE=1`) never touches the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Protocol

from .errors import DD2Error, DownloadError


class HubFile(Protocol):
    """What a download needs to know of a file (`dd2cli.teachers.WeightFile` is one)."""

    key: str
    filename: str
    hf_repo: str
    revision: str
    sha256: str
    size: int | None

    @property
    def hub_filename(self) -> str: ...

#: Environment variable that switches downloads off, like `dd2 --offline`.
OFFLINE_ENV = "DD2_OFFLINE"
#: Environment variable: seconds to wait for the hub to answer before giving up (default 10).
TIMEOUT_ENV = "DD2_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0

_COMMIT = re.compile(r"[0-9a-f]{40}")
_offline = False  # set by `dd2 --offline` for the command being run


def set_offline(value: bool) -> None:
    """Switch downloads off (or back on) for this process; the environment variables still apply."""
    global _offline
    _offline = bool(value)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """True under `dd2 --offline`, `DD2_OFFLINE=1` or `HF_HUB_OFFLINE=1`."""
    return _offline or _truthy(OFFLINE_ENV) or _truthy("HF_HUB_OFFLINE")


def hub_cache_dir() -> Path:
    """The hub cache `huggingface_hub` uses, read from the environment now (not at import time)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{hub_endpoint()}/{repo}/resolve/{revision}/{filename}"


def cached_file(repo: str, filename: str, revision: str = "main") -> Path | None:
    """The complete copy of a hub file in the local hub cache, or None (reads the cache's layout only)."""
    folder = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    commit = revision if _COMMIT.fullmatch(revision) else None
    if commit is None:
        ref = folder / "refs" / revision
        try:
            commit = ref.read_text().strip()
        except OSError:
            return None
    path = folder / "snapshots" / commit / filename
    return path if path.is_file() else None


def download_timeout() -> float:
    """Seconds to wait for a server to answer (`$DD2_DOWNLOAD_TIMEOUT`, default 10)."""
    try:
        return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _reason(exc: BaseException) -> str:
    """A few words for why a download failed (the hub's own messages run over several lines)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return "the file was not found there (HTTP 404)" if status == 404 else f"the server answered HTTP {status}"
    text = str(exc)
    if "Consistency check failed" in text:
        return "the download was cut short"
    name = type(exc).__name__
    if "Connect" in name or "Timeout" in name or isinstance(exc, (ConnectionError, TimeoutError)):
        return f"the server could not be reached ({hub_endpoint()})"
    if "Protocol" in name or "Read" in name:
        return "the connection broke during the download"
    return f"the download failed ({name})"


def _by_hand(w: HubFile, variant: str, reason: str) -> DownloadError:
    return DownloadError(
        f"Could not download {w.hub_filename} for teacher '{variant}' from the Hugging Face hub repository "
        f"{w.hf_repo} (revision {w.revision}) because {reason}; download it by hand from "
        f"{hub_url(w.hf_repo, w.hub_filename, w.revision)} and pass --weights {w.key}=PATH."
    )


def _discard(path: Path) -> None:
    """Remove a downloaded cache entry: the snapshot link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(w: HubFile, variant: str) -> Path:
    """Download `w` into the hub cache (or find it there) and return its path; a `DownloadError` otherwise."""
    if not w.hf_repo:
        raise ValueError(f"{w.filename} has no hub repository to download it from")
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise _by_hand(w, variant, "the huggingface_hub package is not installed") from exc
    endpoint = hub_endpoint()
    timeout = download_timeout()
    url = hub_url(w.hf_repo, w.hub_filename, w.revision)
    try:
        # One quick request first: hf_hub_download retries an unreachable server for about a minute.
        get_hf_file_metadata(url, timeout=timeout, endpoint=endpoint)
        path = Path(hf_hub_download(w.hf_repo, w.hub_filename, revision=w.revision, cache_dir=str(hub_cache_dir()),
                                    endpoint=endpoint, etag_timeout=timeout))
    except Exception as exc:  # the hub's errors, httpx's and OSError: each becomes one sentence
        raise _by_hand(w, variant, _reason(exc)) from exc
    if w.size is not None and path.stat().st_size != w.size:
        got = path.stat().st_size
        _discard(path)
        raise _by_hand(w, variant, f"it has {got} bytes instead of {w.size} (the copy was deleted)")
    if w.sha256:
        got = _sha256(path)
        if got != w.sha256.lower():
            _discard(path)
            raise _by_hand(w, variant, f"its SHA-256 is {got[:12]}… instead of {w.sha256[:12]}… (the copy was deleted)")
    return path


def download_url(url: str, dest: Path, what: str, by_hand: str, size: int | None = None) -> Path:
    """`dest`, downloaded from `url` first when it is not there yet; `what` names the file in messages and
    `by_hand` ends them ("pass --ref PATH"). The file is complete when it exists: a download that breaks, or
    whose length differs from the server's `Content-Length` or from `size`, leaves nothing behind.
    """
    if dest.is_file():
        return dest
    if is_offline():
        raise DD2Error(f"{what} is not in {dest.parent} and dd2 never downloads offline; download {url} and "
                       f"{by_hand}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "dd2"})
        with urllib.request.urlopen(request, timeout=download_timeout()) as response, open(partial, "wb") as f:
            announced = response.headers.get("Content-Length")
            total = int(announced) if announced and announced.isdigit() else None
            from tqdm.auto import tqdm  # huggingface_hub's dependency: the same bars as the weight downloads

            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
        got = partial.stat().st_size
        for expected in (total, size):
            if expected is not None and got != expected:
                raise DownloadError(f"Could not download {what} from {url} because the download was cut short "
                                    f"({got} of {expected} bytes); run the command again, or download it by hand "
                                    f"and {by_hand}.")
        os.replace(partial, dest)
    except DownloadError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"the server answered HTTP {exc.code}"
        elif isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
            reason = "the server could not be reached"
        else:
            reason = f"the download failed ({type(exc).__name__})"
        raise DownloadError(f"Could not download {what} from {url} because {reason}; download it by hand and "
                            f"{by_hand}.") from exc
    finally:
        partial.unlink(missing_ok=True)
    return dest
