"""Sample-set folders: the PNGs `dd2 sample` writes, their manifest, the npz and preview made from them, and
reading any folder of images back (greyscale and palette images become RGB; images with an alpha channel are
refused with one sentence).

A folder holds `000000.png`, ... (one per global index), `manifest.json` (every setting and the source's
identity: a re-run with other settings is refused, one with the same settings finishes the missing PNGs),
`samples_NxHxWx3.npz`, `tokens.npy` (the token ids, see `IDS_PARTS`), `preview.png` and `.dd2-sample.lock`, the
lock its writer holds (`SampleFolderLock`).

Every file is written to a temporary name unique to the writing process and renamed into place, and the manifest
says `complete` only after the npz and the preview are in place: a kill at any moment leaves the old state or the
new one, never a half-written file under a final name, and a re-run finishes the set.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import DD2Error, FileFormatError
from ..files import atomic_write_bytes, fingerprint_file, read_json
from ..images import save_grid, to_uint8
from .adm_npz import _npz_keys, _NpzMember, write_adm_npz
from .labels import labels_from_manifest

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; one writer per folder is then up to the user
    fcntl = None

#: the lock file inside a sample folder; it stays after the write (see `SampleFolderLock`)
LOCK_NAME = ".dd2-sample.lock"


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _first_difference(a: Any, b: Any, prefix: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix[:-1]} is {json.dumps(a)} there but {json.dumps(b)} now"


def _find_resumable(parent: Path, prefix: str, settings: dict, n: int) -> Optional[Path]:
    """Without --out: an earlier set of the same command (same settings, not more images) is continued."""
    best, best_t = None, -1.0
    for m in parent.glob(f"{prefix}-*/manifest.json"):
        try:
            old = json.loads(m.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if old.get("settings") == settings and int(old.get("n", 0)) <= n and m.stat().st_mtime > best_t:
            best, best_t = m.parent, m.stat().st_mtime
    return best


def _check_out_dir(out: Path, settings: dict, n: int) -> Optional[dict]:
    """The existing manifest when `out` can be resumed; a DD2Error when it cannot."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DD2Error(f"{out} exists and is not a folder; choose another --out.")
    manifest = out / "manifest.json"
    if not manifest.is_file():
        # the lock file alone (a writer killed before its first manifest) does not make the folder someone else's
        if any(p.name != LOCK_NAME for p in out.iterdir()):
            raise DD2Error(f"{out} is not empty and is not a dd2 sample set (no manifest.json); choose another --out.")
        return None
    old = read_json(manifest)
    diff = _first_difference(old.get("settings", {}), settings)
    if diff:
        raise DD2Error(f"{out} holds samples made with other settings ({diff}); resume it with the original "
                       f"settings or choose another --out.")
    if int(old.get("n", 0)) > n:
        raise DD2Error(f"{out} already holds {old['n']} samples; pass -n {old['n']} or more to resume it, or choose "
                       f"another --out.")
    return old


class SampleFolderLock:
    """An exclusive `flock` on `FOLDER/.dd2-sample.lock`, held by the one process that writes the folder.

    Non-blocking: a second writer is refused at once instead of waiting behind a job of hours. The kernel releases
    a flock when its holder exits, however it exits (SIGKILL included), so a stale lock file never blocks a re-run.
    The file is never deleted: unlinking a flocked file lets a process that opened the old file and a process that
    creates a new one both believe they hold the lock.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock (creating the folder if needed); a DD2Error, with nothing written, when it is held."""
        if fcntl is None:  # pragma: no cover - see the import
            return
        path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # O_CREAT leaves an existing lock file as it is: a refused writer changes nothing in the folder
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise DD2Error(f"Cannot create {path} ({exc.strerror or exc}); choose a writable --out.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DD2Error(f"Another dd2 sample is writing to {self.folder}; wait for it to finish or choose "
                               f"another --out.") from None
            raise DD2Error(f"Cannot lock {path} ({exc.strerror or exc}); choose an --out on a file system with "
                           f"file locks.") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor of the open file releases the flock
            self.fd = None


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files of writes cut short by a kill (PNGs, npz, manifest, preview, token-id parts:
    `.NAME.*.tmp`).

    Only for the lock's holder: in a locked dd2 sample folder every temporary file belongs to a dead writer.
    """
    for tmp in [*out.glob(".*.tmp"), *(out / IDS_PARTS).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)


def npz_is_readable(path: Path, n: int) -> bool:
    """Whether `path` opens as an ADM npz of `n` images (its zip directory is read; a truncated file fails)."""
    try:
        return _NpzMember(path, "arr_0").shape[0] == n
    except (DD2Error, KeyError):
        return False


#: token ids of the samples: written per batch into IDS_PARTS (resumable, one writer per part), joined into
#: TOKENS_FILE (rows in index = manifest order) when the set is finished; one-step sets also get the distance of
#: every generated latent to its nearest codebook entry in DISTANCES_FILE
IDS_PARTS, TOKENS_FILE, DISTANCES_FILE = "ids-parts", "tokens.npy", "token_distances.npy"


def write_ids_part(out: Path, indices: Sequence[int], ids_BN: Tensor, distance_BN: Optional[Tensor] = None) -> None:
    """The token ids (and distances) of one written batch, atomically, before its images are written."""
    arrays = {"indices": np.asarray(list(indices), dtype=np.int64), "ids": ids_BN.cpu().numpy().astype(np.int32)}
    if distance_BN is not None:
        arrays["distance"] = distance_BN.float().cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (out / IDS_PARTS).mkdir(exist_ok=True)
    atomic_write_bytes(out / IDS_PARTS / f"{int(arrays['indices'][0]):07d}-{len(indices)}.npz", buf.getvalue())


def _read_parts(out: Path) -> Iterator[dict]:
    folder = out / IDS_PARTS
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.npz")):
        try:
            with np.load(path) as z:
                yield {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):
            continue  # unreadable: its indices count as missing and are drawn again


def indices_with_ids(out: Path) -> set[int]:
    return {int(i) for part in _read_parts(out) for i in part["indices"]}


def assemble_ids(out: Path, n: int, vocab_size: int) -> tuple[Path, Optional[Path]]:
    """Rank 0: `tokens.npy (n, L)` (uint16 when the vocabulary fits, else int32) and, where every part has
    them, `token_distances.npy (n, L)` float32, from the parts on disk."""
    ids, dist = None, None
    have = np.zeros(n, dtype=bool)
    with_dist = True
    for part in _read_parts(out):
        keep = part["indices"] < n
        rows, values = part["indices"][keep], part["ids"][keep]
        if ids is None:
            ids = np.zeros((n, values.shape[1]), dtype=np.uint16 if vocab_size <= 65536 else np.int32)
        ids[rows] = values
        have[rows] = True
        if "distance" in part and with_dist:
            if dist is None:
                dist = np.zeros((n, values.shape[1]), dtype=np.float32)
            dist[rows] = part["distance"][keep]
        else:
            with_dist = False
    if ids is None or not have.all():
        missing = int((~have).sum())
        raise DD2Error(f"The token ids of {missing} of {n} samples are missing in {out / IDS_PARTS}; rerun the same "
                       f"command to draw them again.")
    buf = io.BytesIO()
    np.save(buf, ids)
    atomic_write_bytes(out / TOKENS_FILE, buf.getvalue())
    if not (with_dist and dist is not None):
        return out / TOKENS_FILE, None
    buf = io.BytesIO()
    np.save(buf, dist)
    atomic_write_bytes(out / DISTANCES_FILE, buf.getvalue())
    return out / TOKENS_FILE, out / DISTANCES_FILE


def _save_png(path: Path, image_HW3: np.ndarray) -> None:
    from PIL import Image


    buf = io.BytesIO()
    # level 1: lossless like every level, ~4x faster to encode than PIL's default 6 for ~20 % more bytes,
    # which is what keeps 50k images from being bound by PNG compression
    Image.fromarray(image_HW3).save(buf, format="PNG", compress_level=1)
    atomic_write_bytes(path, buf.getvalue())


class _Writer:
    """PNG encoding and atomic writes on a thread pool; one batch in flight while the next is generated."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pool = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2)))
        self.pending: list[Future] = []

    def write(self, indices: Sequence[int], images_B3HW: Tensor) -> None:
        arr = to_uint8(images_B3HW).numpy()
        self.wait()
        self.pending = [self.pool.submit(_save_png, self.out / png_name(i), arr[row]) for row, i in enumerate(indices)]

    def wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _read_pngs(out: Path, indices: Sequence[int], pool: ThreadPoolExecutor) -> np.ndarray:
    return np.stack(list(pool.map(_read_image, [out / png_name(i) for i in indices])))


def _finalise(out: Path, n: int, labels: np.ndarray) -> tuple[Path, Path]:
    """Rank 0: the ADM npz and the preview grid, from the PNGs on disk."""

    missing = [i for i in range(n) if not (out / png_name(i)).is_file()]
    if missing:
        raise DD2Error(f"{len(missing)} of {n} images are missing in {out} (e.g. {png_name(missing[0])}); rerun the "
                       f"same command to finish them.")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        first = _read_pngs(out, [0], pool)
        h, w = first.shape[1:3]
        npz = out / f"samples_{n}x{h}x{w}x3.npz"
        # an npz of an earlier, smaller set goes first (disk space); the manifest says incomplete until the new one
        # is in place, so a kill in between only means a re-run writes it
        for old in out.glob("samples_*x*x*x3.npz"):
            if old != npz:
                old.unlink()
        write_adm_npz(npz, (_read_pngs(out, chunk, pool) for chunk in chunks(range(n), 256)), n, h, w, labels)
        rows = preview_rows(labels)
        preview = _read_pngs(out, [i for row in rows for i in row], pool)
    grid_path = out / "preview.png"
    save_grid(grid_path, torch.from_numpy(preview).permute(0, 3, 1, 2).float() / 255, ncol=len(rows[0]))
    return npz, grid_path


def preview_rows(labels: np.ndarray, classes: int = 10, per_class: int = 10) -> list[list[int]]:
    """Indices for the preview grid: one row per class (as the run's sample grids), the first `classes` classes
    that occur, up to `per_class` images each (every row as long as the shortest, so the grid stays a grid)."""
    rows: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        row = rows.setdefault(int(label), [])
        if len(row) < per_class:
            row.append(i)
        if len(rows) >= classes and all(len(r) >= per_class for r in rows.values()):
            break
    chosen = [rows[c] for c in sorted(rows)[:classes]]
    width = min(len(r) for r in chosen)
    return [r[:width] for r in chosen]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _open_image_checked(file: Path):
    try:
        img = Image.open(file)
    except (UnidentifiedImageError, OSError) as exc:
        raise FileFormatError(f"{file} is not a readable image ({type(exc).__name__}).") from None
    # decision: grey and palette images become RGB (lossless); alpha is refused (no background to assume)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        raise FileFormatError(f"{file} has an alpha channel (mode {img.mode}); dd2 evaluates RGB images, save the "
                              f"samples without alpha.")
    if img.mode not in ("RGB", "L", "P"):
        raise FileFormatError(f"{file} has pixel mode {img.mode}; dd2 evaluates 8-bit RGB or greyscale images.")
    return img


def _read_image(file: Path) -> np.ndarray:
    img = _open_image_checked(file)
    try:
        return np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    except OSError as exc:
        raise FileFormatError(f"{file} is truncated or damaged ({exc}).") from None


@dataclass
class ImageSet:
    """A set of images of one size: a folder, an `.npz` (`arr_0`) or an in-memory array."""

    path: Optional[Path]
    kind: str  # "folder" | "npz" | "memory"
    count: int
    height: int
    width: int
    key: str  # identity for caches: changes when the images change
    name: str
    files: list[Path] = field(default_factory=list)
    array: Optional[np.ndarray] = None  # memory: (N, H, W, 3) uint8
    labels: Optional[np.ndarray] = None
    manifest: Optional[dict] = None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 `(B, H, W, 3)` batches in index order."""
        if self.kind == "memory":
            for s in range(0, self.count, batch_size):
                yield self.array[s:s + batch_size]
        elif self.kind == "npz":
            yield from _NpzMember(self.path, "arr_0").iter_rows(batch_size)
        else:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for s in range(0, self.count, batch_size):
                    imgs = list(pool.map(_read_image, self.files[s:s + batch_size]))
                    for f, im in zip(self.files[s:s + batch_size], imgs):
                        if im.shape[:2] != (self.height, self.width):
                            raise FileFormatError(_size_mismatch(f, im.shape[1], im.shape[0], self))
                    yield np.stack(imgs)


def _size_mismatch(file: Path, w: int, h: int, first: "ImageSet | tuple") -> str:
    fw, fh = (first.width, first.height) if isinstance(first, ImageSet) else first
    return (f"{file} is {w}×{h} but the other images are {fw}×{fh}; all images of a set must have one size "
            f"(resize them first).")


def _folder_files(folder: Path) -> tuple[list[Path], Optional[dict]]:
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():

        manifest = read_json(manifest_path)
        n = int(manifest.get("n", 0))
        files = [folder / f"{i:06d}.png" for i in range(n)]
        existing = {e.name for e in os.scandir(folder)}
        missing = [f for f in files if f.name not in existing]
        if missing:
            raise DD2Error(f"{folder} is an incomplete dd2 sample set ({len(missing)} of {n} images missing, e.g. "
                           f"{missing[0].name}); rerun the same 'dd2 sample' command to finish it.")
        return files, manifest
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    return files, None


def _labels_for_folder(folder: Path, manifest: Optional[dict]) -> Optional[np.ndarray]:
    if manifest is None:
        return None
    npz = manifest.get("npz")
    if npz and (folder / npz).is_file() and "arr_1" in _npz_keys(folder / npz):
        labels = _NpzMember(folder / npz, "arr_1").read_all()
        if len(labels) == int(manifest["n"]):
            return labels
    try:

        return labels_from_manifest(manifest)
    except (KeyError, ValueError, DD2Error):
        return None


def open_images(path: str | os.PathLike, what: str = "samples") -> ImageSet:
    """A folder of PNG/JPEG images or an `.npz` with uint8 `arr_0` `(N, H, W, 3)`; bad input is one sentence."""
    path = Path(path)
    if not path.exists():
        raise DD2Error(f"The {what} {path} do not exist; pass a folder of PNG images or an .npz file.")
    if path.is_dir():
        files, manifest = _folder_files(path)
        if not files:
            raise DD2Error(f"{path} holds no PNG or JPEG images; pass a folder of {what} or an .npz with arr_0.")
        first = _open_image_checked(files[0])
        size = first.size
        # headers only (no decoding): mixed sizes and alpha channels are reported before any work starts
        for f in files[1:]:
            img = _open_image_checked(f)
            if img.size != size:
                raise FileFormatError(_size_mismatch(f, img.size[0], img.size[1], size))
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return ImageSet(path=path, kind="folder", count=len(files), height=size[1], width=size[0],
                        key=h.hexdigest()[:24], name=path.name, files=files,
                        labels=_labels_for_folder(path, manifest), manifest=manifest)
    if path.suffix != ".npz":
        raise DD2Error(f"{path} is neither a folder of images nor an .npz file.")
    keys = _npz_keys(path)
    if "arr_0" not in keys:
        has_stats = "mu" in keys
        raise DD2Error(f"{path} holds {'statistics (mu, sigma) but ' if has_stats else ''}no images (arr_0); "
                       f"{'use it as --ref, not as samples' if has_stats else 'expected an ADM sample file'}.")
    arr = _NpzMember(path, "arr_0")
    if arr.dtype != np.uint8 or len(arr.shape) != 4 or arr.shape[-1] != 3:
        raise DD2Error(f"arr_0 in {path} is {arr.dtype} {tuple(arr.shape)}; expected uint8 (N, H, W, 3) RGB images "
                       f"as the ADM evaluator reads them.")
    if arr.shape[0] == 0:
        raise DD2Error(f"{path} holds no images (arr_0 is empty).")
    labels = None
    if "arr_1" in keys:
        lab = _NpzMember(path, "arr_1")
        if len(lab.shape) == 1 and lab.shape[0] == arr.shape[0] and lab.dtype.kind in "iu":
            labels = lab.read_all().astype(np.int64)
    manifest = None
    if (path.parent / "manifest.json").is_file():

        manifest = read_json(path.parent / "manifest.json")

    return ImageSet(path=path, kind="npz", count=int(arr.shape[0]), height=int(arr.shape[1]), width=int(arr.shape[2]),
                    key=fingerprint_file(path)[:24], name=path.name, labels=labels, manifest=manifest)


def memory_images(images_NHW3: np.ndarray, name: str, key: str, labels: Optional[np.ndarray] = None) -> ImageSet:
    return ImageSet(path=None, kind="memory", count=len(images_NHW3), height=images_NHW3.shape[1],
                    width=images_NHW3.shape[2], key=key, name=name, array=images_NHW3, labels=labels)


def chunks(seq: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for s in range(0, len(seq), size):
        yield seq[s:s + size]
