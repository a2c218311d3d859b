"""VAR architecture against the published facts: key lists, shapes, parameter counts, φ table,
AdaLN unbind order, qk-L2-norm attention and the multi-scale quantizer maths."""

import math

import pytest
import torch
import torch.nn.functional as F

from dd2_var.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig, vae_config, var_config
from dd2_var.model import VAR, AdaLNSelfAttn, SelfAttention
from dd2_var.vqvae import VQVAE, phi_index_table, split_scales
from dd2cli import expected_shapes

MINI_VAR = VARConfig(depth=2, width=128, num_heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 4))
MINI_VAE = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 4))


# ---- the official layouts, written out from docs/teachers/var.md §1.3 and §2.4 ----------------------

def official_var_shapes(depth: int, patch_nums=PATCH_NUMS_256, shared: bool = False) -> dict:
    C, H, L = 64 * depth, depth, sum(p * p for p in patch_nums)
    s = {
        "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
        "word_embed.weight": (C, 32), "word_embed.bias": (C,), "class_emb.weight": (1001, C),
        "lvl_embed.weight": (10, C),
        "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (4096, C), "head.bias": (4096,),
    }
    if shared:
        s["shared_ada_lin.1.weight"] = (6 * C, C)
        s["shared_ada_lin.1.bias"] = (6 * C,)
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({
            b + "attn.scale_mul_1H11": (1, H, 1, 1), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
            b + "attn.zero_k_bias": (C,), b + "attn.mat_qkv.weight": (3 * C, C),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "ffn.fc1.weight": (4 * C, C), b + "ffn.fc1.bias": (4 * C,),
            b + "ffn.fc2.weight": (C, 4 * C), b + "ffn.fc2.bias": (C,),
        })
        if shared:
            s[b + "ada_gss"] = (1, 1, 6, C)
        else:
            s[b + "ada_lin.1.weight"] = (6 * C, C)
            s[b + "ada_lin.1.bias"] = (6 * C,)
    return s


def official_vae_shapes() -> dict:
    s = {}

    def R(prefix, cin, cout):
        s.update({f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
                  f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
                  f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
                  f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)})
        if cin != cout:
            s.update({f"{prefix}.nin_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.nin_shortcut.bias": (cout,)})

    def A(prefix, c):
        s.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
                  f"{prefix}.qkv.weight": (3 * c, c, 1, 1), f"{prefix}.qkv.bias": (3 * c,),
                  f"{prefix}.proj_out.weight": (c, c, 1, 1), f"{prefix}.proj_out.bias": (c,)})

    def conv(prefix, cout, cin, k=3):
        s.update({f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)})

    conv("encoder.conv_in", 160, 3)
    R("encoder.down.0.block.0", 160, 160)
    R("encoder.down.0.block.1", 160, 160)
    conv("encoder.down.0.downsample.conv", 160, 160)
    R("encoder.down.1.block.0", 160, 160)
    R("encoder.down.1.block.1", 160, 160)
    conv("encoder.down.1.downsample.conv", 160, 160)
    R("encoder.down.2.block.0", 160, 320)
    R("encoder.down.2.block.1", 320, 320)
    conv("encoder.down.2.downsample.conv", 320, 320)
    R("encoder.down.3.block.0", 320, 320)
    R("encoder.down.3.block.1", 320, 320)
    conv("encoder.down.3.downsample.conv", 320, 320)
    R("encoder.down.4.block.0", 320, 640)
    R("encoder.down.4.block.1", 640, 640)
    A("encoder.down.4.attn.0", 640)
    A("encoder.down.4.attn.1", 640)
    R("encoder.mid.block_1", 640, 640)
    A("encoder.mid.attn_1", 640)
    R("encoder.mid.block_2", 640, 640)
    s.update({"encoder.norm_out.weight": (640,), "encoder.norm_out.bias": (640,)})
    conv("encoder.conv_out", 32, 640)

    conv("decoder.conv_in", 640, 32)
    R("decoder.mid.block_1", 640, 640)
    A("decoder.mid.attn_1", 640)
    R("decoder.mid.block_2", 640, 640)
    for i in range(3):
        R(f"decoder.up.4.block.{i}", 640, 640)
        A(f"decoder.up.4.attn.{i}", 640)
    conv("decoder.up.4.upsample.conv", 640, 640)
    R("decoder.up.3.block.0", 640, 320)
    R("decoder.up.3.block.1", 320, 320)
    R("decoder.up.3.block.2", 320, 320)
    conv("decoder.up.3.upsample.conv", 320, 320)
    for i in range(3):
        R(f"decoder.up.2.block.{i}", 320, 320)
    conv("decoder.up.2.upsample.conv", 320, 320)
    R("decoder.up.1.block.0", 320, 160)
    R("decoder.up.1.block.1", 160, 160)
    R("decoder.up.1.block.2", 160, 160)
    conv("decoder.up.1.upsample.conv", 160, 160)
    for i in range(3):
        R(f"decoder.up.0.block.{i}", 160, 160)
    s.update({"decoder.norm_out.weight": (160,), "decoder.norm_out.bias": (160,)})
    conv("decoder.conv_out", 3, 160)

    s["quantize.ema_vocab_hit_SV"] = (10, 4096)
    for k in range(4):
        conv(f"quantize.quant_resi.qresi_ls.{k}", 32, 32)
    s["quantize.embedding.weight"] = (4096, 32)
    conv("quant_conv", 32, 32)
    conv("post_quant_conv", 32, 32)
    return s


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


def test_d16_state_dict_matches_the_official_layout():
    expected = official_var_shapes(16)
    assert len(expected) == 220
    got = expected_shapes(_meta(VAR, var_config(16)))
    assert got == expected
    sd = _meta(VAR, var_config(16)).state_dict()
    assert sd["lvl_1L"].dtype == torch.int64


def test_d36_state_dict_matches_the_shared_adaln_layout():
    expected = official_var_shapes(36, PATCH_NUMS_512, shared=True)
    assert len(expected) == 446
    assert expected_shapes(_meta(VAR, var_config(36))) == expected


def test_vqvae_state_dict_matches_the_official_layout():
    expected = official_vae_shapes()
    assert len(expected) == 324
    assert expected_shapes(_meta(VQVAE, vae_config())) == expected


@pytest.mark.parametrize("depth, params, keys", [
    (16, 310_283_520, 220), (20, 600_917_136, 272), (24, 1_033_399_360, 324), (30, 2_010_020_356, 402),
    (36, 2_353_893_904, 446),
])
def test_parameter_counts_equal_upstream(depth, params, keys):
    model = _meta(VAR, var_config(depth))
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_vqvae_and_miniature_parameter_counts_equal_upstream():
    assert sum(p.numel() for p in _meta(VQVAE, vae_config()).parameters()) == 108_948_355
    # the doc's VAR-mini measurement (build_vae_var with patch_nums (1,2,4), V=64, Cvae=8, ch=32, depth 2)
    assert sum(p.numel() for p in _meta(VAR, MINI_VAR).parameters()) == 640_452
    assert sum(p.numel() for p in _meta(VQVAE, MINI_VAE).parameters()) == 4_375_003


def test_image_size_follows_downsampling_and_last_scale():
    assert vae_config().image_size == 256
    assert vae_config(PATCH_NUMS_512).image_size == 512
    assert MINI_VAE.image_size == 64
    assert VQVAEConfig(ch_mult=(1, 2, 2), patch_nums=(1, 2, 3, 4)).image_size == 16


def test_phi_index_table_reproduces_numpy_ties():
    assert phi_index_table(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_table(3, 4) == [0, 2, 3]
    assert phi_index_table(4, 4) == [0, 1, 2, 3]
    vae = VQVAE(MINI_VAE)
    assert vae.quantize.quant_resi.index == [0, 2, 3]


def test_buffers_have_the_official_values():
    var = VAR(MINI_VAR)
    assert var.lvl_1L.tolist() == [[0] + [1] * 4 + [2] * 16]
    bias = var.attn_bias_for_masking[0, 0]
    level = var.lvl_1L[0]
    visible = level[:, None] >= level[None, :]
    assert torch.equal(bias == 0, visible) and torch.isinf(bias[~visible]).all()
    assert all(torch.equal(b.attn.zero_k_bias, torch.zeros(128)) for b in var.blocks)
    assert VQVAE(MINI_VAE).quantize.ema_vocab_hit_SV.shape == (3, 64)


def test_adaln_unbind_order_gamma1_gamma2_scale1_scale2_shift1_shift2():
    torch.manual_seed(0)
    block = AdaLNSelfAttn(MINI_VAR).eval()
    C = 128
    parts = [torch.randn(C) for _ in range(6)]  # gamma1, gamma2, scale1, scale2, shift1, shift2
    with torch.no_grad():
        block.ada_lin[1].weight.zero_()
        block.ada_lin[1].bias.copy_(torch.cat(parts))
    g1, g2, s1, s2, sh1, sh2 = parts
    seen = {}
    block.attn.register_forward_hook(lambda m, i, o: seen.update(attn_in=i[0], attn_out=o))
    block.ffn.register_forward_hook(lambda m, i, o: seen.update(ffn_in=i[0], ffn_out=o))
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        out = block(x, torch.randn(2, C))
    ln = lambda t: F.layer_norm(t, (C,), eps=1e-6)  # noqa: E731
    assert torch.allclose(seen["attn_in"], ln(x) * (1 + s1) + sh1, atol=1e-5)
    x1 = x + seen["attn_out"] * g1
    assert torch.allclose(seen["ffn_in"], ln(x1) * (1 + s2) + sh2, atol=1e-5)
    assert torch.allclose(out, x1 + seen["ffn_out"] * g2, atol=1e-5)


def test_shared_adaln_adds_ada_gss_to_the_shared_projection():
    cfg = VARConfig(**{**MINI_VAR.to_dict(), "shared_aln": True})
    var = VAR(cfg).init_weights(adaln_gamma=1.0, head=1.0)
    assert isinstance(var.shared_ada_lin[1], torch.nn.Linear)
    assert not hasattr(var.blocks[0], "ada_lin")
    cond_BD = var.class_emb(torch.tensor([1, 10]))
    shared = var.shared_ada_lin(cond_BD)
    assert shared.shape == (2, 1, 6, 128)
    mods = var.blocks[1].modulation(shared)
    for j in range(6):
        assert torch.allclose(mods[j], var.blocks[1].ada_gss[:, :, j] + shared[:, :, j])


def test_attention_is_cosine_times_clamped_head_temperature():
    torch.manual_seed(0)
    attn = SelfAttention(MINI_VAR)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
        attn.scale_mul_1H11.copy_(torch.tensor([math.log(3.0), math.log(1000.0)]).view(1, 2, 1, 1))
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        out = attn(x)
        qkv = x @ attn.mat_qkv.weight.T + torch.cat([attn.q_bias, torch.zeros(128), attn.v_bias])
        q, k, v = qkv.view(2, 7, 3, 2, 64).permute(2, 0, 3, 1, 4)
        temperature = torch.tensor([3.0, 100.0]).view(1, 2, 1, 1)  # the second head is clamped at 100
        w = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) * temperature).softmax(-1)
        ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 7, 128))
    assert torch.allclose(out, ref, atol=1e-5)


def test_autoregressive_fhat_equals_fhat_rebuilt_from_tokens():
    torch.manual_seed(0)
    vae = VQVAE(MINI_VAE).eval()
    quant = vae.quantize
    with torch.no_grad():
        f = torch.randn(2, 8, 4, 4)
        ids_per_scale, f_hat_encode = quant.quantize(f)
        ids = torch.cat(ids_per_scale, 1)
        h_scales = quant.lookup_scales(ids)
        # AR one scale at a time, as the sampler does
        f_hat = torch.zeros(2, 8, 4, 4)
        inputs = []
        for si, h in enumerate(h_scales):
            f_hat, nxt = quant.next_ar_input(si, f_hat, h)
            if nxt is not None:
                inputs.append(nxt.flatten(2).transpose(1, 2))
        assert torch.allclose(f_hat, quant.latents_to_fhat(h_scales), atol=1e-6)
        assert torch.allclose(f_hat, f_hat_encode, atol=1e-5)
        assert torch.allclose(torch.cat(inputs, 1), quant.var_input(h_scales), atol=1e-6)
        # the teacher-forcing input of scale k is area_down(f̂ of scales < k): check scale 2 by hand
        up = lambda h: F.interpolate(h, size=(4, 4), mode="bicubic", align_corners=False)  # noqa: E731
        partial = quant.phi(0, up(h_scales[0])) + quant.phi(1, up(h_scales[1]))
        assert torch.allclose(quant.var_input(h_scales)[:, 4:], F.interpolate(partial, size=(4, 4), mode="area")
                              .flatten(2).transpose(1, 2), atol=1e-5)


def test_residual_quantizer_uses_bicubic_up_and_area_down():
    torch.manual_seed(0)
    quant = VQVAE(MINI_VAE).quantize
    h = torch.randn(1, 8, 2, 2)
    added = quant.next_ar_input(1, torch.zeros(1, 8, 4, 4), h)
    up = F.interpolate(h, size=(4, 4), mode="bicubic", align_corners=False)
    # scale 1 of 3 uses φ conv 2; φ(h) = (1 − 0.5)·h + 0.5·conv(h)
    conv = F.conv2d(up, quant.quant_resi.qresi_ls[2].weight, quant.quant_resi.qresi_ls[2].bias, padding=1)
    expected = 0.5 * up + 0.5 * conv
    assert torch.allclose(added[0], expected, atol=1e-6)
    assert torch.allclose(added[1], F.interpolate(expected, size=(4, 4), mode="area"))


def test_split_scales_is_row_major():
    x = torch.arange(21).float().view(1, 21, 1)
    maps = split_scales(x, (1, 2, 4))
    assert maps[1][0, 0].tolist() == [[1, 2], [3, 4]]
    assert maps[2][0, 0, 1].tolist() == [9, 10, 11, 12]
    with pytest.raises(ValueError):
        split_scales(torch.zeros(1, 20, 1), (1, 2, 4))
