"""Reading and writing files: atomic safetensors/JSON, and foreign (official) checkpoints.

What dd2 writes is safetensors + JSON, written to a temporary file in the same folder and renamed
into place, so an interrupted write never leaves a complete-looking file. Safetensors written by
dd2 carry a sha256 of their tensor bytes in the metadata; readers verify it, so a truncated or
bit-flipped file is rejected with a clear message instead of producing silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import CheckpointMismatchError, FileFormatError, write_failure

if TYPE_CHECKING:  # pragma: no cover
    import torch

_HASH_KEY = "dd2_sha256"
#: where dd2 keeps what it can recompute (reference statistics, fitted adapters): `$DD2_CACHE_DIR`, else ~/.cache/dd2
CACHE_ENV = "DD2_CACHE_DIR"


def cache_dir() -> Path:
    """`$DD2_CACHE_DIR`, else `~/.cache/dd2`, read from the environment now (not at import time)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dd2"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file in `path`'s folder, which is then synced to disk and renamed to `path`.

    A failure (disk full, read-only location) leaves `path` as it was and raises one sentence (`OutputError`).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        # mkstemp makes 0600 (and a writer may replace the file): give the result the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_failure(path, exc) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serialisable")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{path} is not valid JSON ({exc}); the file is damaged, delete or restore it.") from None


def _tensor_digest(tensors: Mapping[str, "torch.Tensor"]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")  # (read in place, no copy)
    return h.hexdigest()


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, "torch.Tensor"],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write `tensors` (contiguous CPU copies) with string `metadata` and a content hash.

    The header's `format` is `"pt"`, what the ecosystem's loaders (transformers, diffusers, timm) expect of
    PyTorch tensors; a caller's own `format` is kept beside it as `dd2_format`.
    """
    from safetensors.torch import save_file

    prepared = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {("dd2_format" if str(k) == "format" else str(k)): str(v) for k, v in (metadata or {}).items()}
    meta["format"] = "pt"
    meta[_HASH_KEY] = _tensor_digest(prepared)
    # written from the tensors' own memory: no second copy of a checkpoint (gigabytes at real size) in RAM
    atomic_write(path, lambda tmp: save_file(prepared, str(tmp), metadata=meta))


def load_safetensors(path: str | os.PathLike, device: str = "cpu", verify: bool = True
                     ) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Read a safetensors file; reject a missing, truncated or corrupted one with one sentence."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is truncated or "
            f"corrupted, delete or restore it."
        ) from None
    expected = metadata.pop(_HASH_KEY, None)
    if verify and expected is not None and _tensor_digest(tensors) != expected:
        raise FileFormatError(
            f"{path} is corrupted (its content does not match the checksum written with it); delete or restore it."
        )
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


# ---- foreign checkpoints ------------------------------------------------------------------------

def load_foreign_checkpoint(path: str | os.PathLike, *, unwrap: tuple[str, ...] = ("model", "module", "state_dict", "ema"),
                            what: str = "checkpoint") -> dict[str, "torch.Tensor"]:
    """Load an official `.pth`/`.pt` file as plain weights (`torch.load(weights_only=True)`).

    `unwrap`: keys tried in order when the file holds a dict of dicts (e.g. LlamaGen's `{"model": sd}`);
    pass `()` for files that are the state dict itself.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"The {what} file {path} does not exist.")
    if path.stat().st_size == 0:
        raise FileFormatError(f"The {what} file {path} is empty; download it again.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        if _is_zip(path) or _starts_like_a_pickle(path):  # a real pickle that the weights-only unpickler refused
            raise FileFormatError(
                f"{path} is not a plain-weights {what} (it needs arbitrary code to unpickle: "
                f"{_detail(exc)}); dd2 only loads weights with weights_only=True."
            ) from None
        raise FileFormatError(f"{path} is not a PyTorch {what} ({_detail(exc)}); it is damaged or another kind of "
                              f"file, download it again.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, IndexError, KeyError, ValueError, TypeError,
            AttributeError, UnicodeDecodeError, struct.error) as exc:
        # a text file or random bytes fail deep inside the unpickler with whatever error its first byte causes
        raise FileFormatError(f"{path} is not a readable PyTorch {what} ({_detail(exc)}); it is truncated, damaged "
                              f"or another kind of file, download it again.") from None
    if not isinstance(obj, Mapping):
        raise FileFormatError(f"{path} holds a {type(obj).__name__}, not a state dict; expected the official {what}.")
    for key in unwrap:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        hint = f" (the weights may be under one of {', '.join(repr(k) for k in obj if isinstance(obj[k], Mapping))})" \
            if any(isinstance(v, Mapping) for v in obj.values()) else ""
        raise FileFormatError(f"{path} is not a flat state dict: entry '{bad[0]}' is a {type(obj[bad[0]]).__name__}{hint}.")
    return dict(obj)


def _starts_like_a_pickle(path: Path) -> bool:
    """Whether the file begins with a pickle's PROTO opcode and a protocol number (as `torch.save` writes)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _detail(exc: BaseException) -> str:
    """The first line of an exception, shortened, for the middle of a sentence."""
    first = (str(exc).splitlines() or [""])[0].split(". ")[0][:160].rstrip(".")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def expected_shapes(module: "torch.nn.Module") -> dict[str, tuple[int, ...]]:
    """Key → shape of everything `module.state_dict()` would hold (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_state_dict(expected: "Mapping[str, tuple[int, ...]] | torch.nn.Module", state_dict: Mapping[str, Any], *,
                     variant: str, file: str = "") -> None:
    """Strict key/shape match; the error names the first offending key and the variant."""
    import torch

    if isinstance(expected, torch.nn.Module):
        expected = expected_shapes(expected)
    where = f" in {file}" if file else ""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(
            f"Key '{missing[0]}' is missing{where} ({len(missing)} missing in all); this is not a {variant} checkpoint."
        )
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise CheckpointMismatchError(
            f"Unexpected key '{unexpected[0]}'{where} ({len(unexpected)} unexpected in all); this is not a {variant} "
            f"checkpoint."
        )
    for k, shape in expected.items():
        got = tuple(state_dict[k].shape)
        if got != tuple(shape):
            raise CheckpointMismatchError(
                f"Key '{k}'{where} has shape {got} but {variant} expects {tuple(shape)}; this is not a {variant} checkpoint."
            )


def load_state_dict_strict(module: "torch.nn.Module", state_dict: Mapping[str, "torch.Tensor"], *, variant: str,
                           file: str = "") -> None:
    """`check_state_dict` then `module.load_state_dict(strict=True)`."""
    check_state_dict(module, state_dict, variant=variant, file=file)
    module.load_state_dict(state_dict, strict=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_file(path: str | os.PathLike) -> str:
    """A cheap identity for large files: sha256 of size + first and last 4 MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 22))
        if size > (1 << 23):
            fh.seek(-(1 << 22), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()
