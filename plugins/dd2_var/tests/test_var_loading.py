"""Loading VAR checkpoints strictly (raw `.pth` state dicts), refusing wrong files, registration."""

import subprocess
import sys

import pytest
import torch

import dd2_var
from dd2_var.config import VARConfig, VQVAEConfig
from dd2_var.model import VAR
from dd2_var.teacher import build_official, infer_depth, load_checkpoints
from dd2_var.vqvae import VQVAE
from dd2cli import CheckpointMismatchError, FileFormatError, MissingWeightsError, plugins

MINI_VAR = VARConfig(depth=2, width=128, num_heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 4))
MINI_VAE = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))


def _random_state(module: torch.nn.Module, seed: int) -> dict:
    """Every key of the module with random values (buffers keep their exact values)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        keep = k.endswith(("lvl_1L", "attn_bias_for_masking", "zero_k_bias"))
        out[k] = v.clone() if keep else torch.randn(v.shape, generator=g) * 0.1
    return out


@pytest.fixture
def mini_files(tmp_path):
    var_state, vae_state = _random_state(VAR(MINI_VAR), 0), _random_state(VQVAE(MINI_VAE), 1)
    paths = {"var": tmp_path / "var_d2.pth", "vae": tmp_path / "vae_mini.pth"}
    torch.save(var_state, paths["var"])  # raw state dicts, as the released files
    torch.save(vae_state, paths["vae"])
    return paths, var_state, vae_state


def _load(paths, var_path=None, vae_path=None, cfg=MINI_VAR):
    return load_checkpoints(var_path or paths["var"], vae_path or paths["vae"], cfg, MINI_VAE, variant_name="var-mini")


def test_strict_round_trip_of_raw_pth_files(mini_files):
    paths, var_state, vae_state = mini_files
    var, vae = _load(paths)
    for k, v in var.state_dict().items():
        assert torch.equal(v, var_state[k]), k
    for k, v in vae.state_dict().items():
        assert torch.equal(v, vae_state[k]), k
    ref = VAR(MINI_VAR).eval()
    ref.load_state_dict(var_state, strict=True)
    x_in, labels = torch.randn(2, 20, 8), torch.tensor([0, 10])
    with torch.no_grad():
        assert torch.allclose(var.eval()(labels, x_in), ref(labels, x_in), atol=1e-6)


def test_the_variant_loader_builds_a_teacher_that_records_its_files(mini_files):
    from dd2_var.teacher import VarTeacher

    paths, _, _ = mini_files
    var, vae = _load(paths)
    teacher = VarTeacher(var, vae, variant_name="var-mini", weight_files=paths)
    ident = teacher.identity()
    assert ident["teacher"] == "var-mini" and set(ident["weights"]) == {"var", "vae"}
    assert len(ident["weights"]["var"]["sha256"]) == 64


def test_missing_key_is_named(mini_files, tmp_path):
    paths, var_state, _ = mini_files
    bad = dict(var_state)
    del bad["blocks.1.attn.zero_k_bias"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.attn\.zero_k_bias.*var-mini"):
        _load(paths, var_path=tmp_path / "missing.pth")


def test_unexpected_key_is_named(mini_files, tmp_path):
    paths, var_state, _ = mini_files
    torch.save({**var_state, "uniform_prob": torch.ones(64)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match="uniform_prob"):
        _load(paths, var_path=tmp_path / "extra.pth")


def test_misshaped_key_is_named(mini_files, tmp_path):
    paths, var_state, vae_state = mini_files
    torch.save({**var_state, "head.weight": torch.zeros(65, 128)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight.*\(65, 128\)"):
        _load(paths, var_path=tmp_path / "shape.pth")
    torch.save({**vae_state, "quantize.embedding.weight": torch.zeros(64, 16)}, tmp_path / "vae_shape.pth")
    with pytest.raises(CheckpointMismatchError, match=r"quantize\.embedding\.weight.*tokenizer"):
        _load(paths, vae_path=tmp_path / "vae_shape.pth")


def test_checkpoint_of_another_depth_is_refused_naming_it(mini_files, tmp_path):
    paths, _, _ = mini_files
    deeper = VARConfig(**{**MINI_VAR.to_dict(), "depth": 3, "width": 192, "num_heads": 3})
    torch.save(_random_state(VAR(deeper), 2), tmp_path / "var_d3.pth")
    with pytest.raises(CheckpointMismatchError, match=r"looks like a VAR-d3 checkpoint.*var-mini"):
        _load(paths, var_path=tmp_path / "var_d3.pth")


def test_official_loader_refuses_another_depth(tmp_path):
    """A d20-shaped file given to var-d16: refused from its shapes before anything is built."""
    fake = {"class_emb.weight": torch.zeros(1001, 1280)}
    fake.update({f"blocks.{i}.attn.q_bias": torch.zeros(1280) for i in range(20)})
    torch.save(fake, tmp_path / "var_d20.pth")
    assert infer_depth(fake) == 20 and infer_depth({"class_emb.weight": torch.zeros(1001, 1536)}) == 24
    assert infer_depth({"class_emb.weight": torch.zeros(11, 128), "blocks.2.ada_gss": torch.zeros(1)}, None) == 3
    with pytest.raises(CheckpointMismatchError, match=r"VAR-d20.*var-d16.*--teacher var-d20"):
        build_official(16, tmp_path / "var_d20.pth", tmp_path / "unused.pth", variant_name="var-d16")


def test_tokenizer_file_passed_as_transformer_gets_a_hint(mini_files):
    paths, _, _ = mini_files
    with pytest.raises(CheckpointMismatchError, match="tokenizer checkpoint.*--weights vae="):
        _load(paths, var_path=paths["vae"])


def test_pickled_code_is_refused(tmp_path, mini_files):
    paths, _, _ = mini_files
    torch.save({"cfg": VARConfig()}, tmp_path / "pickle.pth")  # a dataclass needs arbitrary unpickling
    with pytest.raises(FileFormatError):
        _load(paths, var_path=tmp_path / "pickle.pth")


def test_broken_bundled_config_is_a_file_format_error(mini_files, tmp_path):
    from dd2_var.teacher import build_bundled
    from dd2cli import write_json

    paths, _, _ = mini_files
    write_json(tmp_path / "cfg.json", {"var": {**MINI_VAR.to_dict(), "depht": 3}, "vae": MINI_VAE.to_dict()})
    with pytest.raises(FileFormatError, match="depht"):
        build_bundled(tmp_path / "cfg.json", paths["var"], paths["vae"], variant_name="var-mini")
    write_json(tmp_path / "ok.json", {"var": MINI_VAR.to_dict(), "vae": MINI_VAE.to_dict()})
    var, _ = build_bundled(tmp_path / "ok.json", paths["var"], paths["vae"], variant_name="var-mini")
    assert var.cfg == MINI_VAR


def test_registration_lists_every_variant_with_official_files():
    plugins.register_plugin(dd2_var, name="var")
    reg = plugins.registry()
    assert reg.families["var"].plugin == "var"
    for depth, size in ((16, 256), (20, 256), (24, 256), (30, 256), (36, 512)):
        v = reg.get(f"var-d{depth}")
        files = {w.key: w for w in v.weights}
        assert files["var"].filename == f"var_d{depth}.pth" and files["vae"].filename == "vae_ch160v4096z32.pth"
        assert files["var"].url.startswith("https://huggingface.co/FoundationVision/var/")
        assert v.image_size == size and v.options["depth"] == depth
        assert v.options["target"].cfg == 2.0 and v.options["target"].top_k == 900 and v.options["target"].top_p == 0.95
        assert v.options["evaluation"].cfg == 1.5 and v.options["evaluation"].top_p == 0.96
        assert v.options["stage1"].top_k == 900 and v.options["stage1"].cfg == 2.0
    digits = reg.get("var-digits")
    assert all(w.bundled is not None for w in digits.weights)


def test_distill_defaults_train_the_head_first():
    # (that the defaults are valid engine settings is checked for every registered variant by the host's
    # tests/test_conformance.py)
    for variant in dd2_var.family().variants:
        assert variant.distill_defaults["stage1"]["head_only_steps"] > 0  # VAR: head first (paper App. C)


def test_missing_official_weights_name_the_file(tmp_path):
    plugins.register_plugin(dd2_var, name="var")
    with pytest.raises(MissingWeightsError, match=r"var_d16\.pth.*--weights var=PATH"):
        plugins.get_variant("var-d16").load(weights_dir=tmp_path)


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, dd2_var; dd2_var.family(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
