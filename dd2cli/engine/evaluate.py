"""`dd2 eval`: score sample sets against a reference, as OpenAI's ADM evaluator does (docs/evaluation.md).

Sample sets and references are opened by `engine.sample_sets` (folders of PNGs) and `engine.adm_npz` (`.npz`
files in the ADM layout); features come from `engine.features` (Inception or the digits classifier), the numbers
from `engine.metrics`. Reference features are cached under the cache folder, keyed by the reference file and
the feature network. Results are written as JSON next to each sample set (or to `--json-out`); a results file
that cannot be written (a read-only folder, a full disk) is reported and the results are still returned.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import DD2Error
from ..files import cache_dir, fingerprint_file, load_safetensors, read_json, save_safetensors, write_json
from ..plugins import registry
from ..version import __version__
from .adm_npz import ADM_REFERENCES, _npz_keys, _NpzMember, adm_reference
from .features import DigitsExtractor, InceptionExtractor, digits_reference_images, digits_reference_resolution, extract_features
from .metrics import feature_stats, frechet_distance, inception_score, kernel_inception_distance, precision_recall
from .progress import Progress
from .runs import find_latest_sample_set
from .runtime import resolve_device
from .sample_sets import ImageSet, open_images

METRICS = ("fid", "sfid", "kid", "is", "prec-recall", "class-consistency")
#: the metrics `dd2 eval all` computes in each feature space
ALL_METRICS = {"inception": ("fid", "sfid", "kid", "is", "prec-recall"),
               "digits": ("fid", "kid", "is", "prec-recall", "class-consistency")}


@dataclass
class Reference:
    """What the samples are compared with: statistics and/or images."""

    name: str
    key: str
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # mu, sigma, mu_s, sigma_s
    images: Optional[ImageSet] = None
    # the built-in digits reference is made at the classifier's input size and serves samples of any larger size
    any_size: bool = False


def open_reference(path: Optional[str | os.PathLike], space: str, samples: ImageSet) -> Reference:
    """`--ref`: an ADM reference npz (mu/sigma used when present), a folder or an npz of images.

    Without a path the digits space uses the real digits train split at the samples' resolution, or at the
    classifier's 16 px for larger samples (`features.digits_reference_resolution`): its memory does not grow with
    the samples' size.
    """
    if path is None:
        if space == "digits":
            if samples.height != samples.width:
                raise DD2Error(f"The digits reference is square but the samples are {samples.width}×{samples.height}.")
            images = digits_reference_images(digits_reference_resolution(samples.height), "train")
            return Reference(name=images.name, key=images.key, images=images, any_size=True)
        raise DD2Error("Inception metrics need a reference: pass --ref with the ADM reference batch (e.g. "
                       "VIRTUAL_imagenet256_labeled.npz) or a folder of real images.")
    path = Path(path)
    if str(path) in ADM_REFERENCES and not path.exists():  # a name: the ADM batch, downloaded into the cache once
        path = adm_reference(str(path), cache_dir() / "refs")
    if not path.exists():
        raise DD2Error(f"The reference {path} does not exist; pass an ADM reference .npz, a folder of images, or "
                       f"the name of an ADM reference batch ({', '.join(ADM_REFERENCES)}).")
    if path.is_file() and path.suffix == ".npz":
        keys = _npz_keys(path)
        stats = {}
        for k in ("mu", "sigma", "mu_s", "sigma_s"):
            if k in keys:
                stats[k] = _NpzMember(path, k).read_all().astype(np.float64)
        images = open_images(path, what="reference") if "arr_0" in keys else None
        if not stats and images is None:
            raise DD2Error(f"The reference {path} holds neither statistics (mu, sigma) nor images (arr_0).")

        return Reference(name=path.name, key=fingerprint_file(path)[:24], stats=stats, images=images)
    images = open_images(path, what="reference")
    return Reference(name=images.name, key=images.key, images=images)


def _check_resolution(ref: Reference, samples: ImageSet) -> None:
    if ref.any_size:
        return
    if ref.images is not None and (ref.images.height, ref.images.width) != (samples.height, samples.width):
        raise DD2Error(f"The reference {ref.name} holds {ref.images.width}×{ref.images.height} images but the samples "
                       f"{samples.name} are {samples.width}×{samples.height}; use a reference of the samples' "
                       f"resolution.")


def _reference_features(ref: Reference, extractor, batch_size: int, progress: Progress | None,
                        need_pool_features: bool, need_spatial: bool) -> dict[str, np.ndarray]:
    """Reference statistics (and pool features for precision/recall), cached by content."""

    out = dict(ref.stats)
    needs_images = need_pool_features or "mu" not in out or (need_spatial and "mu_s" not in out)
    if not needs_images:
        return out
    if ref.images is None:
        what = "images (arr_0) for precision/recall or KID" if need_pool_features else "the statistics it needs"
        raise DD2Error(f"The reference {ref.name} has no {what}; pass a reference with images.")
    cache = cache_dir() / "eval" / f"ref-{extractor.key}-{ref.key}.safetensors"
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
    # KID: subsets of min(kid_subset_size, samples, reference images) images each, drawn with a fixed seed
    kid_subsets: int = 100
    kid_subset_size: int = 1000


@dataclass
class EvalResult:
    samples: Path
    count: int
    features: str
    reference: str
    metrics: dict[str, float]
    json_path: Optional[Path] = None
    source: str = ""


def _resolve_space(features: str, sets: Sequence[ImageSet]) -> str:
    if features in ("inception", "digits"):
        return features
    if features != "auto":
        raise DD2Error(f"--features must be auto, inception or digits, not '{features}'.")
    # auto: the space the teachers of the sample sets declare (Variant.features); Inception when they disagree
    # or a teacher is unknown here
    reg = registry()
    spaces = set()
    for s in sets:
        variant = reg.variants.get((s.manifest or {}).get("source", {}).get("teacher", ""))
        spaces.add(variant.features if variant is not None else None)
    return spaces.pop() if len(spaces) == 1 and None not in spaces else "inception"


def _default_json_path(samples: Path, space: str) -> Path:
    if samples.is_dir():
        return samples / f"eval-{space}.json"
    return samples.with_name(f"{samples.stem}.eval-{space}.json")


def _write_results(path: Path, obj: Any, progress: Progress, remedy: str) -> bool:
    """Write a results file; when the file system refuses, say so and return False (the results live on).

    Minutes of feature extraction must not be lost to a read-only sample folder or a full disk: the caller still
    returns (and the command prints) the numbers.
    """
    try:
        write_json(path, obj)
    except OSError as exc:
        reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__)
        progress.message(f"The results could not be written to {path} ({reason}); {remedy} (they are printed "
                         f"below).")
        return False
    return True


def _check_json_out(path: Path) -> None:
    """Refuse a `--json-out` that can never be a file, before any work (a missing parent folder is created)."""
    if path.is_dir():
        raise DD2Error(f"--json-out {path} is a folder; pass a file path such as {path / 'eval.json'}.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DD2Error(f"--json-out {path} lies under {parent}, which is a file; pass a path in a folder.")


def evaluate(req: EvalRequest, progress: Progress | None = None) -> list[EvalResult]:
    """Compute `req.metrics` for every sample set; write one JSON per set (or all into `req.json_path`).

    A results file that cannot be written is reported through `progress.message` and its `json_path` is None;
    the results are returned all the same.
    """

    progress = progress or Progress()
    unknown = [m for m in req.metrics if m not in METRICS + ("all",)]
    if unknown:
        raise DD2Error(f"Unknown metric '{unknown[0]}'; choose from {', '.join(METRICS)}.")
    if req.batch_size <= 0:
        raise DD2Error(f"--batch-size must be positive, got {req.batch_size}.")
    if req.json_path is not None:
        _check_json_out(Path(req.json_path))
    paths = list(req.samples) or [find_latest_sample_set()]
    if not req.samples:
        progress.message(f"Evaluating the most recent sample set: {paths[0]}")
    sets = [open_images(p) for p in paths]
    space = _resolve_space(req.features, sets)
    metrics = [m for name in req.metrics for m in (ALL_METRICS[space] if name == "all" else (name,))]
    if "kid" in metrics and (req.kid_subsets < 1 or req.kid_subset_size < 2):
        raise DD2Error(f"KID needs at least 1 subset of at least 2 images; got {req.kid_subsets} subsets of "
                       f"{req.kid_subset_size}.")
    if space == "digits" and "sfid" in metrics:
        raise DD2Error("sFID needs Inception's spatial features; use --features inception (or drop sfid).")
    if space == "inception" and "class-consistency" in metrics:
        raise DD2Error("Class-consistency needs the digits classifier; use --features digits.")
    device = resolve_device(req.device)
    needs_ref = any(m in metrics for m in ("fid", "sfid", "kid", "prec-recall"))
    # precision/recall and KID compare features image by image: statistics (mu, sigma) are not enough
    per_image = [name for m, name in (("prec-recall", "precision/recall"), ("kid", "KID")) if m in metrics]
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
            if per_image and refs[key].images is None:
                raise DD2Error(f"The reference {refs[key].name} has no images (arr_0) for {' and '.join(per_image)}; "
                               f"pass a reference with images.")
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
                                            need_pool_features=bool(per_image),
                                            need_spatial="sfid" in metrics)
        feats = extract_features(extractor, images, req.batch_size, progress, f"features of {images.name}")
        values: dict[str, float] = {}
        if "fid" in metrics:
            mu, sigma = feature_stats(feats["pool"])
            values["fid"] = frechet_distance(mu, sigma, ref_feats["mu"], ref_feats["sigma"])
        if "sfid" in metrics:
            mu, sigma = feature_stats(feats["spatial"])
            values["sfid"] = frechet_distance(mu, sigma, ref_feats["mu_s"], ref_feats["sigma_s"])
        if "kid" in metrics:
            values["kid"], values["kid_std"] = kernel_inception_distance(
                feats["pool"], ref_feats["features"], subsets=req.kid_subsets, subset_size=req.kid_subset_size,
                device=device)
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
                except (DD2Error, OSError):  # unreadable: written anew
                    pass
            if not _write_results(json_path, record, progress, "pass --json-out PATH to save them elsewhere"):
                json_path = None
        results.append(EvalResult(samples=images.path or Path(images.name), count=images.count, features=space,
                                  reference=record["reference"] or "-", metrics=values, json_path=json_path,
                                  source=source))
    if req.json_path is not None:
        written = _write_results(Path(req.json_path), [
            {"samples": str(r.samples), "count": r.count, "features": r.features, "reference": r.reference,
             "metrics": r.metrics} for r in results], progress, "pass another --json-out PATH to save them")
        for r in results:
            r.json_path = Path(req.json_path) if written else None
    return results
