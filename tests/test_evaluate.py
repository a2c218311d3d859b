"""`dd2 eval`: the metrics against independent references, the Inception path, digits metrics, bad input."""

import errno
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_output import plain
from PIL import Image
from typer.testing import CliRunner

from dd2cli import plugins
from dd2cli.cli import app
from dd2cli.engine.adm_npz import write_adm_npz
from dd2cli.engine.metrics import feature_stats, frechet_distance, inception_score, kernel_inception_distance, precision_recall
from dd2cli.engine.progress import Progress
from dd2cli.engine.sample_sets import open_images

runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DD2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no pre-seeded Inception weights


def _write_pngs(folder: Path, images_NHW3: np.ndarray, mode: str = "RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images_NHW3):
        Image.fromarray(im).convert(mode).save(folder / f"img{i:03d}.png")
    return folder


def _random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- statistics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim, n1, n2", [(8, 200, 150), (64, 400, 300)])
def test_frechet_distance_equals_scipy_sqrtm_reference(dim, n1, n2):
    from scipy import linalg

    rng = np.random.default_rng(dim)
    mix = rng.normal(size=(dim, dim))
    a = rng.normal(size=(n1, dim)) @ mix
    b = rng.normal(size=(n2, dim)) @ (mix + 0.3 * rng.normal(size=(dim, dim))) + 0.5
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    assert np.allclose(s1, np.cov(a, rowvar=False)) and s1.dtype == np.float64
    covmean = linalg.sqrtm(s1 @ s2)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    got = frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - expected) <= 1e-6 * abs(expected)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_frechet_distance_of_singular_covariances_and_bad_values():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(6, 20))  # fewer images than dimensions: singular Σ
    value = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert np.isfinite(value) and value > 0
    mu, s = feature_stats(a)
    with pytest.raises(Exception, match="not finite"):
        frechet_distance(mu * np.nan, s, mu, s)
    with pytest.raises(Exception, match="different dimensions"):
        frechet_distance(mu, s, mu[:3], s[:3, :3])


def _brute_force_pr(ref, smp, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.array([np.sort(np.delete(d[i], i))[k - 1] for i in range(len(x))])

    def inside(points, centres, r):
        d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
        return float(np.mean([(d[i] <= r).any() for i in range(len(points))]))

    return inside(smp, ref, radii(ref)), inside(ref, smp, radii(smp))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equal_a_brute_force_knn(k):
    rng = np.random.default_rng(k)
    ref = rng.normal(size=(40, 6))
    smp = rng.normal(size=(35, 6))
    smp[:, 0] += 2.0  # partly overlapping sets
    expected = _brute_force_pr(ref, smp, k)
    got = precision_recall(ref, smp, k=k, batch=7, dtype=torch.float64)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where the balls matter
    # duplicates: a point's own copy is a neighbour at distance 0, itself is not
    dup = np.concatenate([ref, ref[:5]])
    assert precision_recall(dup, smp, k=k, batch=11, dtype=torch.float64) == pytest.approx(
        _brute_force_pr(dup, smp, k), abs=1e-12)


def test_inception_score_definition():
    n, classes = 160, 8  # 10 splits of 16: two images of every class per split
    uniform = np.zeros((n, classes))
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    confident = np.full((n, classes), -50.0)
    confident[np.arange(n), np.arange(n) % classes] = 50.0  # every split covers all classes equally
    assert inception_score(confident, splits=10)[0] == pytest.approx(classes, rel=1e-6)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, classes)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, 4):
        py = part.mean(0)
        scores.append(np.exp(np.mean([(q * np.log(q / py)).sum() for q in part])))
    assert inception_score(logits, splits=4) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)


def _mmd2_double_loop(x, y):
    """The unbiased MMD² with k(a, b) = (a·b/d + 1)³, one pair at a time in float64."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_a_double_loop_of_the_unbiased_estimator():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)  # float32 features, as the extractors give
    y = (rng.normal(size=(12, 5)) * 1.3 + 0.4).astype(np.float32)
    expected = _mmd2_double_loop(x.astype(np.float64), y.astype(np.float64))
    # a subset of the whole set is a permutation of it: every subset gives the full-set value, the spread is 0
    kid, std = kernel_inception_distance(x, y, subsets=3, subset_size=50)
    assert kid == pytest.approx(expected, rel=1e-12) and std < 1e-12 * abs(expected)
    assert expected > 0.1  # clearly away from 0, so that the relative comparisons mean something
    torchmetrics_value = poly_mmd(torch.from_numpy(y).double(), torch.from_numpy(x).double()).item()
    assert kid == pytest.approx(torchmetrics_value, rel=1e-12)
    with pytest.raises(Exception, match="different dimensions"):
        kernel_inception_distance(x, y[:, :3])
    with pytest.raises(Exception, match="at least 2 images per set"):
        kernel_inception_distance(x, y[:1])
    with pytest.raises(Exception, match="not finite"):
        kernel_inception_distance(x * np.nan, y)


def test_kid_is_zero_within_its_std_for_one_distribution_and_many_std_for_a_shift():
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(16, 16)) / 4
    a, b = rng.normal(size=(600, 16)) @ mix, rng.normal(size=(500, 16)) @ mix  # one distribution
    kid, std = kernel_inception_distance(a, b, subsets=50, subset_size=200)
    assert std > 0 and abs(kid) < 2 * std
    shifted = b + 0.5  # half a standard deviation in every direction
    kid_s, std_s = kernel_inception_distance(a, shifted, subsets=50, subset_size=200)
    assert kid_s > 10 * std_s and kid_s > 10 * abs(kid)
    # seeded: the same call gives the same numbers, another seed other subsets
    assert kernel_inception_distance(a, shifted, subsets=50, subset_size=200) == (kid_s, std_s)
    assert kernel_inception_distance(a, shifted, subsets=50, subset_size=200, seed=1) != (kid_s, std_s)


# ---- files -----------------------------------------------------------------------------------------

def test_npz_round_trips_in_the_adm_layout(tmp_path):
    images = _random_images(10, size=8)
    labels = np.arange(10) % 3
    path = tmp_path / "s.npz"
    write_adm_npz(path, (images[s:s + 4] for s in range(0, 10, 4)), 10, 8, 8, labels)
    data = np.load(path)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (10, 8, 8, 3)
    assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    s = open_images(path)
    assert (s.count, s.height, s.width) == (10, 8, 8) and np.array_equal(s.labels, labels)
    assert np.array_equal(np.concatenate(list(s.batches(3))), images)
    # np.savez_compressed files (as other tools write them) are read too
    np.savez_compressed(tmp_path / "c.npz", images)
    assert np.array_equal(np.concatenate(list(open_images(tmp_path / "c.npz").batches(4))), images)
    with pytest.raises(ValueError):
        write_adm_npz(tmp_path / "bad.npz", iter([images[:4]]), 10, 8, 8)
    assert not (tmp_path / "bad.npz").exists()


def test_greyscale_pngs_are_converted_and_alpha_is_refused(tmp_path):
    grey = np.repeat(_random_images(4, 8)[..., :1], 3, axis=-1)
    rgb = open_images(_write_pngs(tmp_path / "rgb", grey))
    lum = open_images(_write_pngs(tmp_path / "grey", grey, mode="L"))
    assert np.array_equal(next(rgb.batches(4)), next(lum.batches(4)))
    _write_pngs(tmp_path / "rgba", grey, mode="RGBA")
    with pytest.raises(Exception, match="alpha channel"):
        open_images(tmp_path / "rgba")


# ---- the Inception path ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised torch-fidelity InceptionV3 saved as a plain state dict (the code path, not the number)."""
    from dd2cli.engine.features import inception_network

    torch.manual_seed(0)
    net = inception_network(None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):  # He init keeps activations O(1) through 94 layers
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_metrics_end_to_end(tmp_path, inception_weights):
    from dd2cli.engine.features import InceptionExtractor

    samples = _write_pngs(tmp_path / "samples", _random_images(6, seed=1))
    ref = _write_pngs(tmp_path / "ref", _random_images(6, seed=2))
    extractor = InceptionExtractor(inception_weights, "cpu")
    feats = extractor(_random_images(2))
    assert feats["pool"].shape == (2, 2048) and feats["logits"].shape == (2, 1008)
    assert feats["spatial"].shape == (2, 17 * 17 * 7) and np.isfinite(feats["spatial"]).all()
    assert feats["pool"].std() > 0
    res = runner.invoke(app, ["eval", "all", str(samples), "--ref", str(ref), "--inception-weights",
                              str(inception_weights), "--device", "cpu", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    record = json.loads((samples / "eval-inception.json").read_text())
    m = record["metrics"]
    assert set(m) == {"fid", "sfid", "kid", "kid_std", "is", "is_std", "precision", "recall"}
    assert all(np.isfinite(v) for v in m.values()) and m["fid"] > 0 and m["sfid"] > 0
    assert record["resize"] == "adm" and record["reference"] == "ref"
    # an ADM reference npz: its mu/sigma (and mu_s/sigma_s) are used; images only for precision/recall
    ref_feats = extractor(np.stack([np.asarray(Image.open(p)) for p in sorted(ref.glob("*.png"))]))
    mu, sigma = feature_stats(ref_feats["pool"])
    mu_s, sigma_s = feature_stats(ref_feats["spatial"])
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    res = runner.invoke(app, ["eval", "fid", str(samples), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                              str(inception_weights), "--device", "cpu", "--json-out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    (entry,) = json.loads((tmp_path / "r.json").read_text())
    assert entry["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-5)
    res = runner.invoke(app, ["eval", "prec-recall", str(samples), "--ref", str(tmp_path / "ref.npz"),
                              "--inception-weights", str(inception_weights), "--device", "cpu"])
    assert res.exit_code != 0 and "no images (arr_0) for precision/recall" in res.output
    # the antialiased resize is another (valid) path
    res = runner.invoke(app, ["eval", "is", str(samples), "--resize", "antialias", "--inception-weights",
                              str(inception_weights), "--device", "cpu", "--json-out", str(tmp_path / "aa.json")])
    assert res.exit_code == 0, res.output


def test_inception_weights_are_found_in_torch_home(tmp_path, monkeypatch):
    from dd2cli.engine.features import INCEPTION_FILENAME, locate_inception_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    target = tmp_path / "th" / "hub" / "checkpoints" / INCEPTION_FILENAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"pre-seeded")
    assert locate_inception_weights() == target
    assert locate_inception_weights(target) == target


def test_missing_inception_weights_are_one_sentence(tmp_path):
    samples = _write_pngs(tmp_path / "samples", _random_images(4))
    res = runner.invoke(app, ["eval", "fid", str(samples), "--ref", str(samples)])
    assert res.exit_code != 0
    text = res.output.replace("\n", " ")
    assert "weights-inception-2015-12-05-6726825d.pth" in text and "--inception-weights" in text
    assert "never downloads" in text and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", "fid", str(samples), "--ref", str(samples), "--inception-weights",
                              str(tmp_path / "nope.pth")])
    assert res.exit_code != 0 and "does not exist" in res.output


def test_wrong_inception_file_is_named(tmp_path):
    bad = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    samples = _write_pngs(tmp_path / "samples", _random_images(4))
    res = runner.invoke(app, ["eval", "is", str(samples), "--inception-weights", str(bad)])
    assert res.exit_code != 0 and "InceptionV3" in res.output and "Traceback" not in res.output


# ---- digits ----------------------------------------------------------------------------------------

def _digits_npz(path: Path, split: str, shuffle_labels: bool = False) -> Path:
    from dd2cli.engine.features import digits_reference_images

    s = digits_reference_images(16, split)
    labels = s.labels.copy()
    if shuffle_labels:
        labels = (labels + 1) % 10
    write_adm_npz(path, iter([s.array]), s.count, 16, 16, labels)
    return path


def test_digits_heldout_split_is_close_to_the_train_reference(tmp_path):
    held = _digits_npz(tmp_path / "heldout.npz", "heldout")
    noise = tmp_path / "noise.npz"
    write_adm_npz(noise, iter([_random_images(359, 16)]), 359, 16, 16, np.zeros(359, dtype=np.int64))
    wrong = _digits_npz(tmp_path / "wrong.npz", "heldout", shuffle_labels=True)
    res = runner.invoke(app, ["eval", "all", str(held), str(noise), str(wrong), "--features", "digits",
                              "--json-out", str(tmp_path / "all.json")])
    assert res.exit_code == 0, res.output
    rows = {Path(r["samples"]).stem: r["metrics"] for r in json.loads((tmp_path / "all.json").read_text())}
    assert set(rows["heldout"]) == {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall",
                                    "class_consistency"}
    # real held-out digits: a small FID (finite-sample bias only), far below noise; the classifier agrees
    assert rows["heldout"]["fid"] < 0.05 * rows["noise"]["fid"]
    # KID is unbiased: real held-out vs real train digits is 0 within its std (the FID is ~58, not 0)
    assert abs(rows["heldout"]["kid"]) < 2 * rows["heldout"]["kid_std"]
    assert rows["noise"]["kid"] > 10 * rows["noise"]["kid_std"] and rows["noise"]["kid"] > 50 * rows["heldout"]["kid_std"]
    assert rows["heldout"]["class_consistency"] > 0.95 and rows["wrong"]["class_consistency"] < 0.1
    assert rows["heldout"]["precision"] > 0.8 and rows["noise"]["precision"] < 0.2
    assert res.output.count(" 359 ") == 3 and res.output.count("dd2 eval (") == 1  # one table, a row per set
    assert list((tmp_path / "cache" / "eval").glob("ref-digits-*-digits-train-16.safetensors"))  # reference cached


def test_eval_kid_prints_and_writes_kid(tmp_path):
    samples = _digit_pngs(tmp_path / "samples", 40)
    res = runner.invoke(app, ["eval", "kid", str(samples), "--features", "digits", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    record = json.loads((samples / "eval-digits.json").read_text())
    m = record["metrics"]
    assert set(m) == {"kid", "kid_std"} and m["kid_std"] > 0 and record["reference"] == "digits-train@16px"
    text = plain(res.output)
    assert f"{m['kid']:.2e}" in text  # 3 significant digits: KID's scale depends on the feature space
    res = runner.invoke(app, ["eval", "kid", str(samples), "--features", "digits", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["metrics"] == m
    # statistics alone (mu, sigma) cannot give KID
    np.savez(tmp_path / "stats.npz", mu=np.zeros(128), sigma=np.eye(128))
    res = runner.invoke(app, ["eval", "kid", str(samples), "--features", "digits", "--ref", str(tmp_path / "stats.npz")])
    assert res.exit_code != 0 and "has no images (arr_0) for KID; pass a reference with images." in plain(res.output)
    assert "Traceback" not in res.output


def test_digits_metrics_of_teacher_sample_sets(tmp_path, monkeypatch):
    """Sample two bundled teachers + the baseline, then one comparison table (auto features = digits)."""
    monkeypatch.chdir(tmp_path)
    plugins.register_plugin(importlib.import_module("dd2_var"), name="var")
    for args, out in ((["--teacher", "var-digits"], "teacher"),
                      (["--teacher", "var-digits", "--baseline", "set-prediction", "--baseline-samples", "100"],
                       "baseline")):
        res = runner.invoke(app, ["-q", "sample", *args, "-n", "40", "--labels", "balanced", "--out", f"dd2-samples/{out}"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "all", "dd2-samples/teacher", "dd2-samples/baseline"])
    assert res.exit_code == 0, res.output
    teacher = json.loads((tmp_path / "dd2-samples/teacher/eval-digits.json").read_text())
    assert teacher["features"] == "digits" and teacher["sample_settings"]["mode"] == "teacher"
    assert teacher["metrics"]["class_consistency"] > 0.8
    # without a path: the most recent complete sample set
    res = runner.invoke(app, ["eval", "class-consistency"])
    assert res.exit_code == 0, res.output
    assert "dd2-samples/baseline" in res.output.replace("\n", "")


def test_bad_sample_sets_are_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    mixed = _write_pngs(tmp_path / "mixed", _random_images(3, 16))
    Image.fromarray(_random_images(1, 8)[0]).save(mixed / "zz.png")
    small_ref = _write_pngs(tmp_path / "ref8", _random_images(5, 8))
    ok = _write_pngs(tmp_path / "ok", _random_images(5, 16))
    grey_npz = tmp_path / "grey.npz"
    np.savez(grey_npz, np.zeros((3, 16, 16), np.uint8))
    stats_npz = tmp_path / "stats.npz"
    np.savez(stats_npz, mu=np.zeros(3), sigma=np.eye(3))
    cases = [
        (["eval", "fid", str(tmp_path / "empty"), "--features", "digits"], "holds no PNG or JPEG images"),
        (["eval", "fid", str(mixed), "--features", "digits"], "all images of a set must have one size"),
        (["eval", "fid", str(ok), "--features", "digits", "--ref", str(small_ref)], "use a reference of the samples' "
                                                                                   "resolution"),
        (["eval", "fid", str(grey_npz), "--features", "digits"], "expected uint8 (N, H, W, 3)"),
        (["eval", "fid", str(stats_npz), "--features", "digits"], "use it as --ref"),
        (["eval", "fid", str(tmp_path / "missing"), "--features", "digits"], "do not exist"),
        (["eval", "sfid", str(ok), "--features", "digits"], "sFID needs Inception"),
        (["eval", "class-consistency", str(ok), "--features", "digits"], "records no labels"),
        (["eval", "fid", str(ok), "--features", "clip"], "is not one of 'auto', 'inception', 'digits'"),
        (["eval", "fid", str(ok), "--features", "inception"], "need a reference"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code != 0, args
        assert message in plain(res.output), (args, res.output)
        assert "Traceback" not in res.output


# ---- results that cannot be written, large digits samples ----------------------------------------

def _digit_pngs(folder: Path, count: int = 20) -> Path:
    from dd2cli.engine.features import digits_reference_images

    return _write_pngs(folder, digits_reference_images(16, "heldout").array[:count])


class _Messages(Progress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


@pytest.mark.parametrize("error", [OSError(errno.EROFS, "Read-only file system"),
                                   PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.ENOSPC, "No space left on device")], ids=["erofs", "eacces", "enospc"])
def test_a_results_file_that_cannot_be_written_loses_no_result(tmp_path, monkeypatch, error):
    """A read-only sample folder or a full disk: the numbers are printed (and returned), the failure is one line."""
    from dd2cli.engine import evaluate as evaluate_mod

    samples = _digit_pngs(tmp_path / "samples")
    good = evaluate_mod.evaluate(evaluate_mod.EvalRequest(metrics=("fid",), samples=[samples], features="digits",
                                                          device="cpu"))[0]
    assert good.json_path == samples / "eval-digits.json" and good.json_path.is_file()
    good.json_path.unlink()

    def refuses(path, obj):
        raise error

    monkeypatch.setattr(evaluate_mod, "write_json", refuses)
    res = runner.invoke(app, ["eval", "fid", str(samples), "--features", "digits", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    text = plain(res.output)
    assert (f"The results could not be written to {samples / 'eval-digits.json'} ({error.strerror}); pass "
            f"--json-out PATH to save them elsewhere (they are printed below).") in text
    assert f"{good.metrics['fid']:.3f}" in text  # the table with the number
    assert "Written:" not in text and "Traceback" not in res.output
    # the engine returns the result, without a results file, and says why through the progress channel
    progress = _Messages()
    (result,) = evaluate_mod.evaluate(evaluate_mod.EvalRequest(metrics=("fid",), samples=[samples],
                                                               features="digits", device="cpu"), progress=progress)
    assert result.json_path is None and result.metrics == good.metrics
    assert len(progress.lines) == 1 and str(samples / "eval-digits.json") in progress.lines[0]
    # --json-out on the same file system: the same, with the other remedy
    res = runner.invoke(app, ["eval", "fid", str(samples), "--features", "digits", "--device", "cpu", "--json-out",
                              str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert (f"could not be written to {tmp_path / 'r.json'} ({error.strerror}); pass another --json-out PATH to "
            f"save them") in plain(res.output)
    assert f"{good.metrics['fid']:.3f}" in res.output and not (tmp_path / "r.json").exists()
    assert not list(samples.glob("*.json"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (the test above simulates it)")
def test_a_read_only_sample_folder_is_evaluated(tmp_path):
    samples = _digit_pngs(tmp_path / "samples")
    samples.chmod(0o555)
    try:
        res = runner.invoke(app, ["eval", "fid", str(samples), "--features", "digits", "--device", "cpu"])
    finally:
        samples.chmod(0o755)
    assert res.exit_code == 0, res.output
    assert "could not be written" in plain(res.output) and "--json-out PATH" in plain(res.output)
    assert "FID" in res.output and not (samples / "eval-digits.json").exists()


def test_json_out_in_a_missing_folder_is_created_and_a_folder_is_refused_first(tmp_path, monkeypatch):
    from dd2cli.engine import evaluate as evaluate_mod

    samples = _digit_pngs(tmp_path / "samples", 8)
    target = tmp_path / "new" / "deeper" / "r.json"
    res = runner.invoke(app, ["eval", "fid", str(samples), "--features", "digits", "--device", "cpu", "--json-out",
                              str(target)])
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(target.read_text())
    assert np.isfinite(entry["metrics"]["fid"]) and f"Written: {target}" in plain(res.output)

    def no_work(*args, **kwargs):
        raise AssertionError("features computed before the --json-out check")

    monkeypatch.setattr(evaluate_mod, "DigitsExtractor", no_work)
    (tmp_path / "a-file").write_text("x")
    for bad, message in ((tmp_path / "new", f"--json-out {tmp_path / 'new'} is a folder; pass a file path such as "
                                             f"{tmp_path / 'new' / 'eval.json'}."),
                         (tmp_path / "a-file" / "sub" / "r.json", f"lies under {tmp_path / 'a-file'}, which is a "
                                                                   f"file; pass a path in a folder.")):
        res = runner.invoke(app, ["eval", "fid", str(samples), "--features", "digits", "--json-out", str(bad)])
        assert res.exit_code == 2, res.output
        assert message in plain(res.output) and "Traceback" not in res.output


def test_digits_reference_is_built_at_the_classifier_resolution(tmp_path, monkeypatch):
    """512-px samples: the reference is the 16-px train split (what the classifier sees), not 512-px images."""
    import torch.nn.functional as F

    from dd2cli.digits import CLASSIFIER_RESOLUTION, load_digits_dataset, to_classifier_input
    from dd2cli.engine import features
    from dd2cli.engine.evaluate import open_reference
    from dd2cli.images import to_uint8

    digits, labels = load_digits_dataset(8, "heldout")
    big = F.interpolate(digits[:6], size=(512, 512), mode="bilinear", align_corners=False)  # as the domain renders
    samples = tmp_path / "big.npz"
    write_adm_npz(samples, iter([to_uint8(big).numpy()]), 6, 512, 512, labels[:6].numpy())
    built = []
    real = features.load_digits_dataset

    def spy(resolution=16, split="train"):
        built.append(resolution)
        return real(resolution, split)

    monkeypatch.setattr(features, "load_digits_dataset", spy)
    ref = open_reference(None, "digits", open_images(samples))
    assert built == [CLASSIFIER_RESOLUTION] and ref.images.array.shape == (1438, 16, 16, 3)  # 1.1 MB, any sample size
    res = runner.invoke(app, ["eval", "all", str(samples), "--features", "digits", "--device", "cpu",
                              "--json-out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert set(built) == {CLASSIFIER_RESOLUTION}
    (entry,) = json.loads((tmp_path / "r.json").read_text())
    assert entry["reference"] == "digits-train@16px" and np.isfinite(entry["metrics"]["fid"])
    assert entry["metrics"]["class_consistency"] == 1.0
    assert list((tmp_path / "cache" / "eval").glob("ref-digits-*-digits-train-16.safetensors"))
    # why the 16-px reference is the right one: what the classifier sees of digits rendered at a multiple of 16 px
    # is the 16-px rendering (the old reference at the samples' size differed by uint8 rounding only)
    for size in (32, 64):
        seen = to_classifier_input(real(size, "train")[0][:64])
        assert torch.allclose(seen, to_classifier_input(real(16, "train")[0][:64]), atol=1e-6)
    # samples of 16 px or less keep today's reference exactly: the train split at their own size
    for size in (16, 8):
        small = open_images(_write_pngs(tmp_path / f"s{size}", _random_images(3, size)))
        ref = open_reference(None, "digits", small)
        assert (ref.images.height, ref.name) == (small.height, f"digits-train@{size}px")
        assert np.array_equal(ref.images.array, to_uint8(real(size, "train")[0]).numpy())


# ---- speed -----------------------------------------------------------------------------------------

def test_speed_compares_generator_teacher_and_k_step(synthetic_plugin):
    res = runner.invoke(app, ["eval", "speed", "--teacher", "synthetic-corr", "--batch-size", "4", "--steps", "2",
                              "--repeats", "2", "--warmup", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for text in ("teacher (3 steps)", "dd2 1 step", "dd2 2 steps", "images/s", "vs teacher"):
        assert text in res.output
    from dd2cli.engine.speed import SpeedRequest, measure_speed

    rows, info = measure_speed(SpeedRequest(teacher="synthetic-corr", batch_sizes=(1, 3), repeats=1, warmup=0,
                                            device="cpu"))
    assert [(r.mode, r.batch_size) for r in rows] == [("teacher (3 steps)", 1), ("dd2 1 step", 1),
                                                      ("teacher (3 steps)", 3), ("dd2 1 step", 3)]
    assert all(r.latency_ms > 0 and r.images_per_s > 0 for r in rows)
    assert rows[1].speedup == pytest.approx(rows[0].latency_ms / rows[1].latency_ms)
    res = runner.invoke(app, ["eval", "speed", "--teacher", "synthetic-corr", "--steps", "9"])
    assert res.exit_code != 0 and "out of range" in res.output
