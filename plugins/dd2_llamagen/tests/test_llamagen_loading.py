"""Loading LlamaGen checkpoints strictly (official .pt layouts), the bundled weights and registration."""

import subprocess
import sys

import pytest
import torch

import dd2_llamagen
from dd2_llamagen.gpt import GPTConfig, LlamaGenGPT
from dd2_llamagen.teacher import load_from_checkpoints
from dd2_llamagen.vq import VQConfig, VQModel
from dd2cli import CheckpointMismatchError, FileFormatError, MissingWeightsError, check_state_dict, expected_shapes, plugins

MINI_GPT = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=32, block_size=16, num_classes=10)
MINI_VQ = VQConfig(codebook_size=32, ch=32, ch_mult=(1, 1, 2), z_channels=32, num_res_blocks=1)


def _random_state(module: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


@pytest.fixture
def mini_files(tmp_path):
    """Official-layout .pt files of a miniature: GPT wrapped in "model", VQ wrapped in "model", GPT bare."""
    gpt, vq = LlamaGenGPT(MINI_GPT), VQModel(MINI_VQ)
    gpt_state, vq_state = _random_state(gpt, 0), _random_state(vq, 1)
    paths = {"wrapped": tmp_path / "c2i_mini.pt", "bare": tmp_path / "c2i_mini_fsdp.pt", "vq": tmp_path / "vq.pt"}
    torch.save({"model": gpt_state}, paths["wrapped"])
    torch.save(gpt_state, paths["bare"])
    torch.save({"model": vq_state}, paths["vq"])
    return paths, gpt_state, vq_state


@pytest.mark.parametrize("layout", ["wrapped", "bare"])
def test_strict_round_trip_of_official_layouts(mini_files, layout):
    paths, gpt_state, vq_state = mini_files
    teacher = load_from_checkpoints(paths[layout], paths["vq"], MINI_GPT, MINI_VQ, variant="llamagen-mini")
    for k, v in teacher.gpt.state_dict().items():
        assert torch.equal(v, gpt_state[k]), k
    for k, v in teacher.vq.state_dict().items():
        assert torch.equal(v, vq_state[k]), k
    # the rebuilt model computes with the loaded values (RoPE table restored after the meta build)
    ref = LlamaGenGPT(MINI_GPT).eval()
    ref.load_state_dict(gpt_state)
    ids, labels = torch.randint(0, 32, (2, 16)), torch.tensor([0, 10])
    with torch.no_grad():
        assert torch.allclose(teacher.logits(ids, labels), ref(ids, labels), atol=1e-5)
    assert set(teacher.identity()["weights"]) == {"gpt", "vq"}
    assert teacher.codebook().norm(dim=-1).sub(1).abs().max() < 1e-5


def test_wrong_key_names_the_key_and_variant(mini_files, tmp_path):
    paths, gpt_state, _ = mini_files
    bad = dict(gpt_state)
    bad["layers.0.attention.qkv.weight"] = bad.pop("layers.0.attention.wqkv.weight")
    torch.save({"model": bad}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError, match=r"layers\.0\.attention\.wqkv\.weight.*llamagen-mini"):
        load_from_checkpoints(tmp_path / "bad.pt", paths["vq"], MINI_GPT, MINI_VQ, variant="llamagen-mini")


def test_unexpected_key_is_an_error(mini_files, tmp_path):
    paths, gpt_state, _ = mini_files
    torch.save({**gpt_state, "freqs_cis": torch.zeros(17, 16, 2)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointMismatchError, match="freqs_cis"):
        load_from_checkpoints(tmp_path / "extra.pt", paths["vq"], MINI_GPT, MINI_VQ, variant="llamagen-mini")


def test_wrong_shape_names_the_key(mini_files, tmp_path):
    paths, gpt_state, _ = mini_files
    torch.save({**gpt_state, "output.weight": torch.zeros(33, 64)}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointMismatchError, match=r"output\.weight.*\(33, 64\)"):
        load_from_checkpoints(tmp_path / "shape.pt", paths["vq"], MINI_GPT, MINI_VQ, variant="llamagen-mini")


def test_vq_without_usage_buffer_is_rejected(mini_files, tmp_path):
    paths, _, _ = mini_files
    vq_state = _random_state(VQModel(MINI_VQ), 2)
    del vq_state["quantize.codebook_used"]
    torch.save({"model": vq_state}, tmp_path / "vq_bad.pt")
    with pytest.raises(CheckpointMismatchError, match="quantize.codebook_used"):
        load_from_checkpoints(paths["wrapped"], tmp_path / "vq_bad.pt", MINI_GPT, MINI_VQ, variant="llamagen-mini")


def test_gpt_checkpoint_given_as_tokenizer_is_rejected(mini_files):
    paths, _, _ = mini_files
    with pytest.raises(CheckpointMismatchError, match="tokenizer"):
        load_from_checkpoints(paths["wrapped"], paths["wrapped"], MINI_GPT, MINI_VQ, variant="llamagen-mini")


def test_not_a_checkpoint_is_a_file_format_error(mini_files, tmp_path):
    paths, _, _ = mini_files
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FileFormatError):
        load_from_checkpoints(tmp_path / "junk.pt", paths["vq"], MINI_GPT, MINI_VQ, variant="llamagen-mini")


@pytest.mark.parametrize("size", ["B", "XXL"])
def test_real_size_key_lists_check_against_meta_models(size):
    """Key/shape lists of a real-size model are checked without any real memory (meta device)."""
    with torch.device("meta"):
        gpt = LlamaGenGPT(GPTConfig.named(size, 384))
    shapes = expected_shapes(gpt)
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    check_state_dict(gpt, fake, variant=f"llamagen-{size.lower()}")
    fake["layers.3.feed_forward.w2.weight"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointMismatchError, match="w2"):
        check_state_dict(gpt, fake, variant=f"llamagen-{size.lower()}")


# ---- registration and variants --------------------------------------------------------------------

def test_plugin_registers_the_family():
    plugins.register_plugin(dd2_llamagen, name="llamagen")
    reg = plugins.registry()
    names = set(reg.families["llamagen"].variants[i].name for i in range(len(reg.families["llamagen"].variants)))
    assert names == {"llamagen-b", "llamagen-l", "llamagen-b-384", "llamagen-l-384", "llamagen-xl", "llamagen-xxl",
                     "llamagen-3b", "llamagen-digits"}
    b = reg.get("llamagen-b")
    assert {w.key: w.filename for w in b.weights} == {"gpt": "c2i_B_256.pt", "vq": "vq_ds16_c2i.pt"}
    assert all(w.url.startswith("https://huggingface.co/FoundationVision/LlamaGen/") for w in b.weights)
    assert reg.get("llamagen-3b").options == {"gpt_size": "3B", "image_size": 384}
    assert reg.get("llamagen-xxl").weights[0].filename == "c2i_XXL_384.pt"
    assert all(w.bundled is not None and w.bundled.is_file() for w in reg.get("llamagen-digits").weights)


def test_official_variant_without_files_says_where_to_get_them(tmp_path):
    variant = {v.name: v for v in dd2_llamagen.FAMILY.variants}["llamagen-l"]
    with pytest.raises(MissingWeightsError, match=r"c2i_L_256\.pt.*huggingface"):
        variant.load(weights_dir=tmp_path)


def test_official_loader_uses_named_configs(tmp_path, monkeypatch):
    """The variant loader builds GPT-{size} at its image size and the official VQ config."""
    import dd2_llamagen.teacher as teacher_mod

    seen = {}

    def fake_load(gpt_path, vq_path, gpt_cfg, vq_cfg, **kw):
        seen.update(gpt=gpt_cfg, vq=vq_cfg, **kw)
        return "teacher"

    monkeypatch.setattr(teacher_mod, "load_from_checkpoints", fake_load)
    for name in ("c2i_XL_384.pt", "vq_ds16_c2i.pt"):
        (tmp_path / name).write_bytes(b"x")
    variant = {v.name: v for v in dd2_llamagen.FAMILY.variants}["llamagen-xl"]
    assert variant.load(weights_dir=tmp_path) == "teacher"
    assert seen["gpt"] == GPTConfig.named("XL", 384) and seen["gpt"].block_size == 576
    assert seen["vq"] == VQConfig() and seen["image_size"] == 384 and seen["variant"] == "llamagen-xl"


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, dd2_llamagen; dd2_llamagen.FAMILY; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
