"""Feature networks of `dd2 eval`: Inception (FID, sFID, IS, precision/recall) and the digits classifier.

The Inception network is torch-fidelity's port of the TF graph (through torchmetrics), loaded from a local
file, downloaded from torch-fidelity's release on first use unless offline. The digits classifier ships with dd2
(`dd2cli/data/`); its features score the bundled digits teachers, where Inception means nothing.
"""

from __future__ import annotations

import io
import os
import re
import socket
import urllib.error
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from ..digits import CLASSIFIER_PATH, CLASSIFIER_RESOLUTION, load_digits_classifier, load_digits_dataset
from ..downloads import download_timeout, is_offline
from ..errors import DD2Error, DownloadError
from ..files import check_state_dict, fingerprint_file, load_foreign_checkpoint
from ..images import to_uint8
from .progress import Progress
from .sample_sets import ImageSet, memory_images

#: torch-fidelity's port of the TF Inception graph used by the ADM evaluator (566 keys, 23.9M values)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
#: Environment variable naming another address of the Inception file (a mirror; tests serve it on loopback)
INCEPTION_URL_ENV = "DD2_INCEPTION_URL"


def inception_url() -> str:
    """Where a missing Inception file is downloaded from: `$DD2_INCEPTION_URL`, else torch-fidelity's release."""
    return os.environ.get(INCEPTION_URL_ENV) or INCEPTION_URL


def locate_inception_weights(explicit: Optional[str | os.PathLike] = None) -> Path:
    """`--inception-weights PATH`, else the file in `$TORCH_HOME/hub/checkpoints/`, downloaded there on first use.

    The download (`torch.hub.download_url_to_file`) writes a temporary file that is moved into place only when
    its SHA-256 starts with the prefix in the URL's file name (`...-6726825d.pth`, torch.hub's convention); offline
    (`dd2 --offline`, `DD2_OFFLINE=1`) nothing is downloaded.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DD2Error(f"The Inception weights file {path} does not exist; pass the path of {INCEPTION_FILENAME} "
                           f"(download: {INCEPTION_URL}).")
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
    if hub.is_file():
        return hub
    url = inception_url()
    if is_offline():
        raise DD2Error(f"The Inception weights {INCEPTION_FILENAME} were not found and dd2 never downloads them "
                       f"offline; download {url} and pass --inception-weights PATH, or put the file in {hub.parent}.")
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", url)
    previous = socket.getdefaulttimeout()
    try:
        hub.parent.mkdir(parents=True, exist_ok=True)
        socket.setdefaulttimeout(download_timeout())  # urllib waits forever otherwise
        torch.hub.download_url_to_file(url, str(hub), hash_prefix=match.group(1) if match else None, progress=True)
    except Exception as exc:  # urllib's, OSError and torch.hub's hash check: each becomes one sentence
        hub.unlink(missing_ok=True)
        reason = _download_failure(exc)
        raise DownloadError(f"Could not download the Inception weights {INCEPTION_FILENAME} from {url} ({reason}); "
                            f"download the file by hand and pass --inception-weights PATH, or put it in "
                            f"{hub.parent}.") from exc
    finally:
        socket.setdefaulttimeout(previous)
    return hub


def _download_failure(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered HTTP {exc.code}"
    if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return "the server could not be reached"
    if isinstance(exc, RuntimeError) and "hash" in str(exc):
        return "its SHA-256 does not match the prefix in the file name, so it was deleted"
    return f"the download failed ({type(exc).__name__})"


def inception_network(state_dict: Optional[Mapping[str, Tensor]] = None, resize: str = "adm") -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (via torchmetrics' `NoTrainInceptionV3`), random when `state_dict` is None.

    `resize`: `adm` = TF1 bilinear resize to 299 (as the TF graph of the ADM evaluator), `antialias` =
    `F.interpolate(antialias=True)` (torchmetrics' default).
    """

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

        check_state_dict(net, state_dict, variant="torch-fidelity InceptionV3 (pt_inception-2015-12-05)")
        net.load_state_dict(dict(state_dict), strict=True)
    return net.eval().requires_grad_(False)


class InceptionExtractor:
    """pool_3 (2048), unbiased logits (1008) and the sFID map (first 7 channels of mixed_6/conv)."""

    space = "inception"

    def __init__(self, weights: Optional[str | os.PathLike] = None, device: str = "cpu", resize: str = "adm") -> None:
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
        self.net = load_digits_classifier(device=device)
        self.device = device
        self.key = f"digits-{fingerprint_file(CLASSIFIER_PATH)[:16]}"

    @torch.no_grad()
    def __call__(self, images_BHW3: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images_BHW3)).to(self.device).permute(0, 3, 1, 2).float() / 255
        f = self.net.features(x)
        return {"pool": f.cpu().numpy().astype(np.float32), "logits": self.net.out(f).cpu().numpy()}


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


def digits_reference_resolution(sample_resolution: int) -> int:
    """The resolution of the real-digits reference for samples of `sample_resolution`: at most the classifier's.

    The classifier sees every image at `CLASSIFIER_RESOLUTION` (`dd2cli.digits.to_classifier_input`), so a reference
    rendered any larger only costs memory (3.9 GB for 256-px samples). Larger samples are area-reduced to 16×16;
    the real digits rendered at 16 px are exactly what the classifier sees of the real digits rendered at a
    multiple of 16 px (bilinear from 8 px is linear over each 16-px cell, so averaging it over the cell gives its
    value at the cell's centre), up to the uint8 rounding of the large rendering: the reference of
    16-px samples serves every larger size. Samples at 16 px or less keep a reference at their own size (the
    16-px numbers are unchanged; 8-px ones too): the classifier upsamples it exactly as it upsamples the samples,
    from the same uint8 grid, and it is no larger than a 16-px one.
    """
    return min(int(sample_resolution), CLASSIFIER_RESOLUTION)


def digits_reference_images(resolution: int, split: str = "train") -> ImageSet:
    """The real digits split at `resolution`, quantised to uint8 exactly as samples are written.

    `dd2 eval` asks for `digits_reference_resolution(samples' resolution)`, never more than 16 px.
    """

    images, labels = load_digits_dataset(resolution, split)
    return memory_images(to_uint8(images).numpy(), name=f"digits-{split}@{resolution}px",
                         key=f"digits-{split}-{resolution}", labels=labels.numpy())
