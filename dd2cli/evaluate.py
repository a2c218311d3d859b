"""The metrics of `dd2 eval`, computed as OpenAI's ADM evaluator computes them (evaluation.md).

- Fréchet distance (FID on Inception pool_3, sFID on the first 7 channels of `mixed_6/conv`,
  digits-FID on the digits classifier's penultimate features), float64: `μ` by mean, `Σ` by
  `np.cov(rowvar=False)`, the trace of `sqrtm(Σ1Σ2)` from a symmetric eigendecomposition.
- Inception score: softmax of the 1008-way logits without bias, 10 splits, mean of `exp(KL)`.
- Precision / recall: k-NN manifolds (Kynkäänniemi et al. 2019), `k = 3`, in batches.
- Class-consistency (digits): the fraction of samples the digits classifier assigns the label
  they were sampled with.

Image sets are folders of PNGs (a dd2 sample set, or any folder of PNG/JPEG files) or `.npz`
files in the ADM layout (`arr_0` uint8 NHWC, optional labels in `arr_1`); large `.npz` files are
streamed, never loaded whole. Greyscale and palette images are converted to RGB (grey replicated);
images with an alpha channel are refused. The Inception network is torch-fidelity's port of the
TF graph (through torchmetrics), loaded from a local file only: dd2 never downloads weights.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import statistics
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .errors import DD2Error, FileFormatError

#: torch-fidelity's port of the TF Inception graph used by the ADM evaluator (566 keys, 23.9M values)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
CACHE_ENV = "DD2_CACHE_DIR"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METRICS = ("fid", "sfid", "is", "prec-recall", "class-consistency")
#: the metrics `dd2 eval all` computes in each feature space
ALL_METRICS = {"inception": ("fid", "sfid", "is", "prec-recall"),
               "digits": ("fid", "is", "prec-recall", "class-consistency")}


def default_cache_dir() -> Path:
    """`$DD2_CACHE_DIR`, else `~/.cache/dd2` (reference statistics and features)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dd2"


# =====================================================================================================
# statistics (float64 numpy, as the ADM evaluator)
# =====================================================================================================

def feature_stats(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(μ (D,), Σ (D, D))` in float64: the mean and `np.cov(rowvar=False)`."""
    x = np.asarray(features_ND, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DD2Error(f"A Fréchet distance needs at least 2 images per set; got {x.shape[0] if x.ndim else 0}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """`tr(sqrtm(Σ1 Σ2))` without a general matrix square root.

    `Σ1 Σ2` is similar to the symmetric PSD matrix `Σ1^½ Σ2 Σ1^½`, so both have the same
    eigenvalues and `tr sqrtm(Σ1Σ2) = Σ_i sqrt(λ_i)`. Tiny negative eigenvalues are rounding noise:
    the imaginary parts they would give `sqrtm` are what ADM drops, so they are clamped to 0.
    """
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """`‖μ1−μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr(sqrtm(Σ1Σ2))` in float64 (ADM; retry with `eps·I` if needed)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DD2Error(f"The two feature sets have different dimensions ({mu1.shape[0]} vs {mu2.shape[0]}); "
                       f"compute both with the same network (--features).")
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = math.nan
    if not math.isfinite(tr_covmean):
        offset = np.eye(sigma1.shape[0]) * eps
        try:
            tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
        except np.linalg.LinAlgError:
            tr_covmean = math.nan
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if not math.isfinite(value):
        raise DD2Error("The Fréchet distance is not finite: the features contain NaN or inf values; check the "
                       "images (and the network weights).")
    return value


def inception_score(logits_NK: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over `splits` contiguous splits of `exp(E_x KL(p(y|x) ‖ p(y)))` (float64)."""
    x = np.asarray(logits_NK, np.float64)
    x = x - x.max(axis=1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for part in np.array_split(np.arange(len(p)), max(1, min(splits, len(p)))):
        p_part, log_part = p[part], log_p[part]
        log_py = np.log(p_part.mean(axis=0) + 1e-300)
        kl = (p_part * (log_part - log_py[None])).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a_BD: Tensor, b_MD: Tensor) -> Tensor:
    """Squared Euclidean distances `(B, M)`, as ADM's `‖a‖² − 2ab + ‖b‖²` clamped at 0."""
    d = (a_BD * a_BD).sum(1, keepdim=True) - 2 * a_BD @ b_MD.T + (b_MD * b_MD).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features_ND: Tensor, k: int = 3, batch: int = 1024) -> Tensor:
    """Squared distance of every point to its k-th nearest neighbour, itself excluded."""
    n = features_ND.shape[0]
    if n <= k:
        raise DD2Error(f"Precision/recall with k={k} needs more than {k} images per set; got {n}.")
    out = torch.empty(n, dtype=features_ND.dtype, device=features_ND.device)
    for s in range(0, n, batch):
        d = _sq_dists(features_ND[s:s + batch], features_ND)
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, rows + s] = -1.0  # self: always the smallest, so the (k+1)-th smallest is the k-th other
        out[s:s + batch] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _fraction_inside(points_BD: Tensor, centres_MD: Tensor, radii_M: Tensor, batch: int) -> float:
    inside = 0
    for s in range(0, points_BD.shape[0], batch):
        d = _sq_dists(points_BD[s:s + batch], centres_MD)
        inside += int((d <= radii_M[None]).any(dim=1).sum())
    return inside / points_BD.shape[0]


def precision_recall(ref_ND, samples_MD, k: int = 3, batch: int = 1024, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) with k-NN radii, computed in batches.

    precision: fraction of samples inside the union of reference balls (radius = distance of each
    reference point to its k-th nearest reference neighbour); recall: the same with the roles swapped.
    """
    ref = torch.as_tensor(np.asarray(ref_ND), device=device).to(dtype)
    smp = torch.as_tensor(np.asarray(samples_MD), device=device).to(dtype)
    radii_ref = manifold_radii(ref, k, batch)
    radii_smp = manifold_radii(smp, k, batch)
    return _fraction_inside(smp, ref, radii_ref, batch), _fraction_inside(ref, smp, radii_smp, batch)


# =====================================================================================================
# image sets: folders of PNGs and ADM .npz files
# =====================================================================================================

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

    Written to a temporary file and renamed, so an interrupted write leaves no complete-looking npz.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
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


def _open_image_checked(file: Path):
    from PIL import Image, UnidentifiedImageError

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
        from .files import read_json

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
        from .sample import labels_from_manifest

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
        from .files import read_json

        manifest = read_json(path.parent / "manifest.json")
    from .files import fingerprint_file

    return ImageSet(path=path, kind="npz", count=int(arr.shape[0]), height=int(arr.shape[1]), width=int(arr.shape[2]),
                    key=fingerprint_file(path)[:24], name=path.name, labels=labels, manifest=manifest)


def memory_images(images_NHW3: np.ndarray, name: str, key: str, labels: Optional[np.ndarray] = None) -> ImageSet:
    return ImageSet(path=None, kind="memory", count=len(images_NHW3), height=images_NHW3.shape[1],
                    width=images_NHW3.shape[2], key=key, name=name, array=images_NHW3, labels=labels)


def digits_reference_images(resolution: int, split: str = "train") -> ImageSet:
    """The real digits split at `resolution`, quantised to uint8 exactly as samples are written."""
    from .digits import load_digits_dataset
    from .images import to_uint8

    images, labels = load_digits_dataset(resolution, split)
    return memory_images(to_uint8(images).numpy(), name=f"digits-{split}@{resolution}px",
                         key=f"digits-{split}-{resolution}", labels=labels.numpy())


# =====================================================================================================
# feature extractors
# =====================================================================================================

def locate_inception_weights(explicit: Optional[str | os.PathLike] = None) -> Path:
    """`--inception-weights PATH`, else the file pre-seeded in `$TORCH_HOME/hub/checkpoints/`."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DD2Error(f"The Inception weights file {path} does not exist; pass the path of {INCEPTION_FILENAME} "
                           f"(download: {INCEPTION_URL}).")
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
    if hub.is_file():
        return hub
    raise DD2Error(f"The Inception weights {INCEPTION_FILENAME} were not found and dd2 never downloads them; "
                   f"download {INCEPTION_URL} and pass --inception-weights PATH, or put the file in {hub.parent}.")


def inception_network(state_dict: Optional[Mapping[str, Tensor]] = None, resize: str = "adm") -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (via torchmetrics' `NoTrainInceptionV3`), random when `state_dict` is None.

    `resize`: `adm` = TF1 bilinear resize to 299 (as the TF graph of the ADM evaluator), `antialias` =
    `F.interpolate(antialias=True)` (torchmetrics' default).
    """
    import io

    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as exc:  # pragma: no cover - a dependency
        raise DD2Error(f"Inception features need torchmetrics[image] (torch-fidelity): {exc}; run "
                       f"pip install 'torchmetrics[image]'.") from None

    class _Inception(NoTrainInceptionV3):
        def load_state_dict(self, sd, strict=True, assign=False):  # noqa: D401
            # the base constructor loads its file with weights_only=False; we give it an empty
            # placeholder and load the (weights_only=True) tensors afterwards
            if not sd:
                return None
            return super().load_state_dict(sd, strict=strict, assign=assign)

    if resize not in ("adm", "antialias"):
        raise DD2Error(f"--resize must be adm or antialias, not '{resize}'.")
    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    try:
        net = _Inception(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                         feature_extractor_weights_path=placeholder, antialias=resize == "antialias")
    except TypeError as exc:  # pragma: no cover - an old torchmetrics without the antialias option
        raise DD2Error(f"This torchmetrics is too old for dd2's Inception features ({exc}); run pip install -U "
                       f"'torchmetrics[image]'.") from None
    if not hasattr(net, "_torch_fidelity_forward"):  # pragma: no cover - the same, another way
        raise DD2Error("This torchmetrics is too old for dd2's Inception features; run pip install -U "
                       "'torchmetrics[image]'.")
    if state_dict is not None:
        from .files import check_state_dict

        check_state_dict(net, state_dict, variant="torch-fidelity InceptionV3 (pt_inception-2015-12-05)")
        net.load_state_dict(dict(state_dict), strict=True)
    return net.eval().requires_grad_(False)


class InceptionExtractor:
    """pool_3 (2048), unbiased logits (1008) and the sFID map (first 7 channels of mixed_6/conv)."""

    space = "inception"

    def __init__(self, weights: Optional[str | os.PathLike] = None, device: str = "cpu", resize: str = "adm") -> None:
        from .files import fingerprint_file, load_foreign_checkpoint

        path = locate_inception_weights(weights)
        state_dict = load_foreign_checkpoint(path, unwrap=(), what="Inception weights")
        self.net = inception_network(state_dict, resize).to(device)
        self.device, self.resize = device, resize
        self.key = f"inception-{resize}-{fingerprint_file(path)[:16]}"
        self.weights_path = path
        self._spatial: list[Tensor] = []
        # TF's mixed_6/conv is the 1×1 branch of the 7th mixed block = torch-fidelity's Mixed_6d.branch1x1
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: self._spatial.append(o))

    @torch.no_grad()
    def __call__(self, images_BHW3: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images_BHW3)).to(self.device).permute(0, 3, 1, 2)
        self._spatial.clear()
        pool_BD, logits_BK = self.net._torch_fidelity_forward(x)
        spatial_B = self._spatial.pop()[:, :7].permute(0, 2, 3, 1)  # NHWC as the TF graph, then flatten
        return {"pool": pool_BD.float().cpu().numpy(), "logits": logits_BK.float().cpu().numpy(),
                "spatial": spatial_B.reshape(x.shape[0], -1).float().cpu().numpy()}


class DigitsExtractor:
    """The shipped digits classifier: 128-d penultimate features, 10-way logits."""

    space = "digits"

    def __init__(self, device: str = "cpu") -> None:
        from .digits import CLASSIFIER_PATH, load_digits_classifier
        from .files import fingerprint_file

        self.net = load_digits_classifier(device=device)
        self.device = device
        self.key = f"digits-{fingerprint_file(CLASSIFIER_PATH)[:16]}"

    @torch.no_grad()
    def __call__(self, images_BHW3: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images_BHW3)).to(self.device).permute(0, 3, 1, 2).float() / 255
        f = self.net.features(x)
        return {"pool": f.cpu().numpy().astype(np.float32), "logits": self.net.out(f).cpu().numpy()}


class Progress:
    """No-op progress sink; the CLI supplies a rich bar."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def stop(self) -> None: ...
    def message(self, text: str) -> None: ...


def extract_features(extractor, images: ImageSet, batch_size: int, progress: Progress | None = None,
                     description: str = "") -> dict[str, np.ndarray]:
    progress = progress or Progress()
    parts: dict[str, list[np.ndarray]] = {}
    progress.start(description or f"features of {images.name}", images.count)
    try:
        for batch in images.batches(batch_size):
            for k, v in extractor(batch).items():
                parts.setdefault(k, []).append(v)
            progress.advance(len(batch))
    finally:
        progress.stop()
    return {k: np.concatenate(v) for k, v in parts.items()}


# =====================================================================================================
# references
# =====================================================================================================

@dataclass
class Reference:
    """What the samples are compared with: statistics and/or images."""

    name: str
    key: str
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # mu, sigma, mu_s, sigma_s
    images: Optional[ImageSet] = None


def open_reference(path: Optional[str | os.PathLike], space: str, samples: ImageSet) -> Reference:
    """`--ref`: an ADM reference npz (mu/sigma used when present), a folder or an npz of images.

    Without a path the digits space uses the real digits train split at the samples' resolution.
    """
    if path is None:
        if space == "digits":
            if samples.height != samples.width:
                raise DD2Error(f"The digits reference is square but the samples are {samples.width}×{samples.height}.")
            images = digits_reference_images(samples.height, "train")
            return Reference(name=images.name, key=images.key, images=images)
        raise DD2Error("Inception metrics need a reference: pass --ref with the ADM reference batch (e.g. "
                       "VIRTUAL_imagenet256_labeled.npz) or a folder of real images.")
    path = Path(path)
    if not path.exists():
        raise DD2Error(f"The reference {path} does not exist; pass an ADM reference .npz or a folder of images.")
    if path.is_file() and path.suffix == ".npz":
        keys = _npz_keys(path)
        stats = {}
        for k in ("mu", "sigma", "mu_s", "sigma_s"):
            if k in keys:
                stats[k] = _NpzMember(path, k).read_all().astype(np.float64)
        images = open_images(path, what="reference") if "arr_0" in keys else None
        if not stats and images is None:
            raise DD2Error(f"The reference {path} holds neither statistics (mu, sigma) nor images (arr_0).")
        from .files import fingerprint_file

        return Reference(name=path.name, key=fingerprint_file(path)[:24], stats=stats, images=images)
    images = open_images(path, what="reference")
    return Reference(name=images.name, key=images.key, images=images)


def _check_resolution(ref: Reference, samples: ImageSet) -> None:
    if ref.images is not None and (ref.images.height, ref.images.width) != (samples.height, samples.width):
        raise DD2Error(f"The reference {ref.name} holds {ref.images.width}×{ref.images.height} images but the samples "
                       f"{samples.name} are {samples.width}×{samples.height}; use a reference of the samples' "
                       f"resolution.")


def _reference_features(ref: Reference, extractor, batch_size: int, progress: Progress | None,
                        need_pool_features: bool, need_spatial: bool) -> dict[str, np.ndarray]:
    """Reference statistics (and pool features for precision/recall), cached by content."""
    from .files import load_safetensors, save_safetensors

    out = dict(ref.stats)
    needs_images = need_pool_features or "mu" not in out or (need_spatial and "mu_s" not in out)
    if not needs_images:
        return out
    if ref.images is None:
        what = "images (arr_0) for precision/recall" if need_pool_features else "the statistics it needs"
        raise DD2Error(f"The reference {ref.name} has no {what}; pass a reference with images.")
    cache = default_cache_dir() / "eval" / f"ref-{extractor.key}-{ref.key}.safetensors"
    if cache.is_file():
        try:
            tensors, _ = load_safetensors(cache)
            cached = {k: v.numpy() for k, v in tensors.items()}
            return {**cached, **out}
        except DD2Error:
            pass  # a damaged cache is recomputed
    feats = extract_features(extractor, ref.images, batch_size, progress, f"reference {ref.name}")
    computed: dict[str, np.ndarray] = {"features": feats["pool"].astype(np.float32)}
    computed["mu"], computed["sigma"] = feature_stats(feats["pool"])
    if "spatial" in feats:
        computed["mu_s"], computed["sigma_s"] = feature_stats(feats["spatial"])
    try:
        save_safetensors(cache, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in computed.items()},
                         {"reference": ref.name, "extractor": extractor.key})
    except OSError:
        pass  # a read-only cache folder only costs time
    return {**computed, **out}


# =====================================================================================================
# evaluation
# =====================================================================================================

@dataclass
class EvalRequest:
    metrics: tuple[str, ...]
    samples: Sequence[Path] = ()
    ref: Optional[Path] = None
    features: str = "auto"  # auto | inception | digits
    inception_weights: Optional[Path] = None
    resize: str = "adm"
    batch_size: int = 100
    device: str = "auto"
    json_path: Optional[Path] = None
    k: int = 3
    splits: int = 10


@dataclass
class EvalResult:
    samples: Path
    count: int
    features: str
    reference: str
    metrics: dict[str, float]
    json_path: Optional[Path] = None
    source: str = ""


def find_latest_sample_set() -> Path:
    """The newest complete dd2 sample set under the runs folder and ./samples."""
    from .distill import default_runs_dir

    candidates = list(default_runs_dir().glob("*/samples/*/manifest.json")) + list(Path("samples").glob("*/manifest.json"))
    best, best_t = None, -1.0
    for m in candidates:
        try:
            if not json.loads(m.read_text()).get("complete"):
                continue
        except (OSError, json.JSONDecodeError):
            continue
        t = m.stat().st_mtime
        if t > best_t:
            best, best_t = m.parent, t
    if best is None:
        raise DD2Error(f"No finished sample set found under {default_runs_dir()} or ./samples; run 'dd2 sample' first "
                       f"or pass the samples' path.")
    return best


def _resolve_space(features: str, sets: Sequence[ImageSet]) -> str:
    if features in ("inception", "digits"):
        return features
    if features != "auto":
        raise DD2Error(f"--features must be auto, inception or digits, not '{features}'.")
    # auto: a digits teacher's samples are scored in the digits space (Inception means nothing there)
    teachers = [(s.manifest or {}).get("source", {}).get("teacher", "") for s in sets]
    return "digits" if teachers and all(t and "digits" in t for t in teachers) else "inception"


def _default_json_path(samples: Path, space: str) -> Path:
    if samples.is_dir():
        return samples / f"eval-{space}.json"
    return samples.with_name(f"{samples.stem}.eval-{space}.json")


def evaluate(req: EvalRequest, progress: Progress | None = None) -> list[EvalResult]:
    """Compute `req.metrics` for every sample set; write one JSON per set (or all into `req.json_path`)."""
    from .distill import resolve_device
    from .files import read_json, write_json

    progress = progress or Progress()
    unknown = [m for m in req.metrics if m not in METRICS + ("all",)]
    if unknown:
        raise DD2Error(f"Unknown metric '{unknown[0]}'; choose from {', '.join(METRICS)}.")
    if req.batch_size <= 0:
        raise DD2Error(f"--batch-size must be positive, got {req.batch_size}.")
    paths = list(req.samples) or [find_latest_sample_set()]
    if not req.samples:
        progress.message(f"Evaluating the most recent sample set: {paths[0]}")
    sets = [open_images(p) for p in paths]
    space = _resolve_space(req.features, sets)
    metrics = [m for name in req.metrics for m in (ALL_METRICS[space] if name == "all" else (name,))]
    if space == "digits" and "sfid" in metrics:
        raise DD2Error("sFID needs Inception's spatial features; use --features inception (or drop sfid).")
    if space == "inception" and "class-consistency" in metrics:
        raise DD2Error("Class-consistency needs the digits classifier; use --features digits.")
    device = resolve_device(req.device)
    needs_ref = any(m in metrics for m in ("fid", "sfid", "prec-recall"))
    if space == "inception" and needs_ref and req.ref is None:
        raise DD2Error("Inception metrics need a reference: pass --ref with the ADM reference batch (e.g. "
                       "VIRTUAL_imagenet256_labeled.npz) or a folder of real images.")
    if space == "inception" and req.resize not in ("adm", "antialias"):
        raise DD2Error(f"--resize must be adm or antialias, not '{req.resize}'.")
    # every input is checked before the (slow) networks load
    refs: dict[Any, Reference] = {}
    for images in sets:
        if needs_ref:
            key = "given" if req.ref is not None else (images.height, images.width)
            if key not in refs:
                refs[key] = open_reference(req.ref, space, images)
            _check_resolution(refs[key], images)
            if "prec-recall" in metrics and refs[key].images is None:
                raise DD2Error(f"The reference {refs[key].name} has no images (arr_0) for precision/recall; pass a "
                               f"reference with images.")
        if "class-consistency" in metrics and images.labels is None:
            raise DD2Error(f"{images.name} records no labels (no arr_1 and no dd2 manifest); class-consistency needs "
                           f"the label each image was sampled with.")
    extractor = DigitsExtractor(device) if space == "digits" else \
        InceptionExtractor(req.inception_weights, device, req.resize)
    results: list[EvalResult] = []
    for images in sets:
        ref = None
        if needs_ref:
            ref = refs["given" if req.ref is not None else (images.height, images.width)]
            # first: a reference that lacks what a metric needs fails before the samples' features
            ref_feats = _reference_features(ref, extractor, req.batch_size, progress,
                                            need_pool_features="prec-recall" in metrics,
                                            need_spatial="sfid" in metrics)
        feats = extract_features(extractor, images, req.batch_size, progress, f"features of {images.name}")
        values: dict[str, float] = {}
        if "fid" in metrics:
            mu, sigma = feature_stats(feats["pool"])
            values["fid"] = frechet_distance(mu, sigma, ref_feats["mu"], ref_feats["sigma"])
        if "sfid" in metrics:
            mu, sigma = feature_stats(feats["spatial"])
            values["sfid"] = frechet_distance(mu, sigma, ref_feats["mu_s"], ref_feats["sigma_s"])
        if "is" in metrics:
            values["is"], values["is_std"] = inception_score(feats["logits"], req.splits)
        if "prec-recall" in metrics:
            values["precision"], values["recall"] = precision_recall(ref_feats["features"], feats["pool"], k=req.k,
                                                                     device=device)
        if "class-consistency" in metrics:
            pred = feats["logits"].argmax(axis=1)
            values["class_consistency"] = float((pred == images.labels).mean())
        source = ""
        if images.manifest:
            src = images.manifest.get("source", {})
            source = f"{src.get('teacher', '?')} {images.manifest.get('settings', {}).get('mode', '')}".strip()
        record = {"samples": str(images.path) if images.path else images.name, "count": images.count,
                  "features": space, "resize": req.resize if space == "inception" else None,
                  "reference": ref.name if ref is not None else None, "metrics": values,
                  "dd2_version": __version__, "time": _dt.datetime.now().isoformat(timespec="seconds")}
        if space == "inception":
            record["inception_weights"] = str(extractor.weights_path)
        if images.manifest:
            record["sample_settings"] = images.manifest.get("settings")
        json_path = None
        if req.json_path is None and images.path is not None:
            json_path = _default_json_path(images.path, space)
            if json_path.is_file():  # keep metrics of earlier runs with the same reference and resize
                try:
                    old = read_json(json_path)
                    same_ref = record["reference"] is None or old.get("reference") in (None, record["reference"])
                    if same_ref and old.get("resize") == record["resize"] and old.get("count") == images.count:
                        record["metrics"] = {**old.get("metrics", {}), **values}
                        record["reference"] = record["reference"] or old.get("reference")
                except DD2Error:
                    pass
            write_json(json_path, record)
        results.append(EvalResult(samples=images.path or Path(images.name), count=images.count, features=space,
                                  reference=record["reference"] or "-", metrics=values, json_path=json_path,
                                  source=source))
    if req.json_path is not None:
        write_json(req.json_path, [{"samples": str(r.samples), "count": r.count, "features": r.features,
                                    "reference": r.reference, "metrics": r.metrics} for r in results])
        for r in results:
            r.json_path = req.json_path
    return results


# =====================================================================================================
# speed
# =====================================================================================================

@dataclass
class SpeedRequest:
    run_dir: Optional[Path] = None
    teacher: Optional[str] = None
    weights: Mapping[str, str] = field(default_factory=dict)
    device: str = "auto"
    batch_sizes: tuple[int, ...] = (1, 64)
    k_steps: tuple[int, ...] = ()
    warmup: int = 2
    repeats: int = 5
    precision: str = "fp32"  # fp32 | bf16 (CUDA autocast)
    compile: bool = False  # torch.compile the one-step generator


@dataclass
class SpeedRow:
    mode: str
    batch_size: int
    latency_ms: float  # median wall time of one batch, decode included
    images_per_s: float
    speedup: float = 1.0  # vs the teacher at the same batch size


def _timed(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_sampling(teacher, generator, device: str, batch_sizes: Sequence[int], k_steps: Sequence[int] = (),
                  warmup: int = 2, repeats: int = 5, settings=None,
                  progress: Progress | None = None, precision: str = "fp32", compile: bool = False,
                  decode: bool = True) -> list[SpeedRow]:
    """Median latency / images per second of the teacher, the one-step generator and k-step sampling.

    Every mode ends in pixels (`teacher.decode`), so the decoder's cost is in every row; with
    `decode=False` every mode stops at token ids (the benchmarks time the decoder apart). `precision`
    "bf16" runs every mode under CUDA bf16 autocast; `compile` wraps the generator in `torch.compile`
    (its compilation happens in the warm-up runs, so keep `warmup >= 1` with it).
    """
    from .accel import check_precision, maybe_compile, sampling_context

    check_precision(precision, device)
    generator = maybe_compile(generator, compile)
    progress = progress or Progress()
    spec = teacher.spec
    settings = settings or spec.evaluation
    for k in k_steps:
        if not 1 < k <= spec.num_steps:
            raise DD2Error(f"--steps {k} is out of range: k-step sampling needs 2 <= k <= {spec.num_steps}.")
    rows: list[SpeedRow] = []
    for bs in batch_sizes:
        labels = torch.arange(bs, device=device) % spec.num_classes
        g = torch.Generator(device=device).manual_seed(0)
        eps = torch.randn(bs, spec.num_tokens, spec.latent_dim, generator=g, device=device)

        finish = teacher.decode if decode else (lambda tokens: tokens)

        def teacher_run():
            with sampling_context(precision, device):
                return finish(teacher.sample(labels, settings, generator=g))

        def one_step():
            with sampling_context(precision, device):
                return finish(teacher.as_tokens(generator(eps, labels)))

        def k_step(k):
            def run():
                with sampling_context(precision, device):
                    tokens = teacher.as_tokens(generator(eps, labels))
                    return finish(teacher.sample(labels, settings, prefix_BN=tokens,
                                                 start_step=spec.num_steps - (k - 1), generator=g))
            return run

        progress.message(f"batch {bs}: teacher ({spec.num_steps} steps)")
        t_teacher = _timed(teacher_run, device, warmup, repeats)
        rows.append(SpeedRow(f"teacher ({spec.num_steps} steps)", bs, t_teacher * 1e3, bs / t_teacher, 1.0))
        progress.message(f"batch {bs}: one-step generator")
        t_one = _timed(one_step, device, warmup, repeats)
        rows.append(SpeedRow("dd2 1 step", bs, t_one * 1e3, bs / t_one, t_teacher / t_one))
        for k in k_steps:
            progress.message(f"batch {bs}: {k} steps")
            t_k = _timed(k_step(k), device, warmup, repeats)
            rows.append(SpeedRow(f"dd2 {k} steps", bs, t_k * 1e3, bs / t_k, t_teacher / t_k))
    return rows


def measure_speed(req: SpeedRequest, progress: Progress | None = None) -> tuple[list[SpeedRow], dict]:
    """`dd2 eval speed`: one-step generator vs the teacher's AR sampler (and k-step), same device."""
    from .distill import resolve_device

    progress = progress or Progress()
    if not req.batch_sizes or any(b <= 0 for b in req.batch_sizes):
        raise DD2Error("Batch sizes must be positive.")
    if req.repeats <= 0 or req.warmup < 0:
        raise DD2Error("--repeats must be positive and --warmup non-negative.")
    device = resolve_device(req.device)
    from .accel import check_precision

    check_precision(req.precision, device)  # before minutes of loading a teacher
    from .sample import build_speed_subjects

    teacher, generator, info = build_speed_subjects(req.run_dir, req.teacher, req.weights, device)
    rows = time_sampling(teacher, generator, device, req.batch_sizes, req.k_steps, req.warmup, req.repeats,
                         progress=progress, precision=req.precision, compile=req.compile)
    info = {**info, "device": device, "warmup": req.warmup, "repeats": req.repeats, "precision": req.precision,
            "compile": req.compile,
            "sampling": teacher.spec.evaluation.as_dict(), "torch": torch.__version__}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return rows, info
