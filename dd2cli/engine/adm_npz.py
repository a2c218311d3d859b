"""Sample sets as `.npz` files in the ADM layout: `arr_0` uint8 NHWC images, optional labels in `arr_1`.

Writing streams the images into the zip member (a 50,000-image set never sits in memory); reading streams rows
of a member without loading it whole.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..downloads import download_url
from ..errors import DD2Error, FileFormatError

#: the ADM evaluator's ImageNet reference batches (openai/guided-diffusion), by the names `dd2 eval --ref` accepts
ADM_REFERENCES = {
    "imagenet256": "imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    "imagenet512": "imagenet/512/VIRTUAL_imagenet512.npz",
}
ADM_REFERENCES_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches"
#: Environment variable naming another base address of the reference batches (a mirror; tests serve them locally)
ADM_REFERENCES_URL_ENV = "DD2_ADM_REFERENCES_URL"


def adm_reference(name: str, cache_dir: Path) -> Path:
    """The named ADM reference batch (`imagenet256`, `imagenet512`), downloaded into `cache_dir` once."""
    if name not in ADM_REFERENCES:
        raise DD2Error(f"There is no reference called '{name}'; named references: {', '.join(ADM_REFERENCES)}.")
    base = (os.environ.get(ADM_REFERENCES_URL_ENV) or ADM_REFERENCES_URL).rstrip("/")
    url = f"{base}/{ADM_REFERENCES[name]}"
    filename = ADM_REFERENCES[name].rsplit("/", 1)[-1]
    return download_url(url, cache_dir / filename, what=f"The ADM reference batch {filename} (--ref {name})",
                        by_hand="pass --ref PATH")


def _read_npy_header(fh) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    return np.lib.format.read_array_header_2_0(fh)  # 2.0 and 3.0 share the layout past the magic


class _NpzMember:
    """One array of an `.npz`, read in row batches straight from the zip (never the whole array)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.name = path, key + ".npy"
        try:
            with zipfile.ZipFile(path) as zf:
                if self.name not in zf.namelist():
                    raise KeyError(key)
                with zf.open(self.name) as fh:
                    self.shape, fortran, self.dtype = _read_npy_header(fh)
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise FileFormatError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc}); it is "
                                  f"truncated or not an npz.") from None
        if fortran:
            raise FileFormatError(f"{path}: '{key}' is stored in Fortran order; save it with np.savez.")

    def read_all(self) -> np.ndarray:
        with zipfile.ZipFile(self.path) as zf, zf.open(self.name) as fh:
            _read_npy_header(fh)
            data = fh.read()
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape).copy()

    def iter_rows(self, batch: int) -> Iterator[np.ndarray]:
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.name) as fh:
            _read_npy_header(fh)
            for s in range(0, self.shape[0], batch):
                count = min(batch, self.shape[0] - s)
                data = fh.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise FileFormatError(f"{self.path} ends early (row {s + len(data) // max(row_bytes, 1)} of "
                                          f"{self.shape[0]}); it is truncated.")
                # a bytearray keeps the batch writable (torch.from_numpy warns about read-only buffers)
                yield np.frombuffer(bytearray(data), dtype=self.dtype).reshape((count,) + tuple(self.shape[1:]))


def _npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise FileFormatError(f"{path} is not a readable .npz file ({type(exc).__name__}); it is truncated or "
                              f"not an npz.") from None


def write_adm_npz(path: str | os.PathLike, images: Iterator[np.ndarray], count: int, height: int, width: int,
                  labels: Optional[np.ndarray] = None) -> None:
    """Stream uint8 `(B, H, W, 3)` batches into an ADM sample file (`arr_0`, labels in `arr_1`).

    Written to a temporary file and renamed, so an interrupted write leaves no complete-looking npz. The temporary
    name carries the process id and a random part: two writers of one folder never write into each other's file
    (a process killed mid-write leaves its `.<name>.<pid>-<random>.tmp` behind; `dd2 sample` removes those).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (count, height, width, 3)}
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_1_0(fh, header)
                for batch in images:
                    if batch.dtype != np.uint8 or batch.shape[1:] != (height, width, 3):
                        raise ValueError(f"batch {batch.shape} {batch.dtype} does not match ({height}, {width}, 3)")
                    fh.write(np.ascontiguousarray(batch).tobytes())
                    written += batch.shape[0]
            if written != count:
                raise ValueError(f"{written} images written, {count} expected")
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asarray(labels, dtype=np.int64))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
