"""LlamaGen GPT and VQ networks: sizes, key layout, 2-D RoPE, norms, KV cache (docs/teachers/llamagen.md)."""

import math

import pytest
import torch

from dd2_llamagen.gpt import GPTConfig, KVCache, LlamaGenGPT, RMSNorm, Trunk, apply_rope, find_multiple, rope_2d_table
from dd2_llamagen.vq import VQConfig, VQModel

MINI = GPTConfig(dim=128, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10)

# (size, n_layer, dim, FFN hidden, params, state-dict keys) from the upstream classes
SIZES = [
    ("B", 12, 768, 2048, 110_888_448, 88),
    ("L", 24, 1024, 2816, 342_910_976, 172),
    ("XL", 36, 1280, 3584, 774_699_520, 256),
    ("XXL", 48, 1536, 4096, 1_410_972_672, 340),
    ("3B", 24, 3200, 8704, 3_096_659_200, 172),
]


def _meta_gpt(size, image_size=256):
    with torch.device("meta"):
        return LlamaGenGPT(GPTConfig.named(size, image_size))


@pytest.mark.parametrize("size,n_layer,dim,hidden,params,keys", SIZES)
def test_gpt_sizes_match_upstream(size, n_layer, dim, hidden, params, keys):
    cfg = GPTConfig.named(size)
    assert (cfg.n_layer, cfg.dim, cfg.ffn_hidden) == (n_layer, dim, hidden)
    gpt = _meta_gpt(size)
    assert sum(p.numel() for p in gpt.parameters()) == params
    state = gpt.state_dict()
    assert len(state) == keys
    assert not any(k.endswith(".bias") for k in state), "the LlamaGen GPT has no biases"
    assert state["cls_embedding.embedding_table.weight"].shape == (1001, dim)
    assert state["layers.0.attention.wqkv.weight"].shape == (3 * dim, dim)


def test_gpt_b_state_dict_is_the_official_layout():
    state = {k: tuple(v.shape) for k, v in _meta_gpt("B", 384).state_dict().items()}
    expected = {
        "cls_embedding.embedding_table.weight": (1001, 768),
        "tok_embeddings.weight": (16384, 768),
        "norm.weight": (768,),
        "output.weight": (16384, 768),
    }
    for i in range(12):
        p = f"layers.{i}."
        expected.update({
            p + "attention.wqkv.weight": (2304, 768),
            p + "attention.wo.weight": (768, 768),
            p + "feed_forward.w1.weight": (2048, 768),
            p + "feed_forward.w3.weight": (2048, 768),
            p + "feed_forward.w2.weight": (768, 2048),
            p + "attention_norm.weight": (768,),
            p + "ffn_norm.weight": (768,),
        })
    assert state == expected  # block size 576 changes nothing: no learned positions, no freqs_cis


def test_block_size_and_grid():
    assert GPTConfig.named("B", 256).block_size == 256
    assert GPTConfig.named("L", 384).block_size == 576 and GPTConfig.named("L", 384).grid_size == 24
    assert find_multiple(int(2 * 4 * 3200 / 3), 256) == 8704
    with pytest.raises(ValueError):
        GPTConfig(dim=128, n_head=2, block_size=15)


def test_vq_matches_upstream_size_and_layout():
    with torch.device("meta"):
        vq = VQModel(VQConfig())
    assert sum(p.numel() for p in vq.parameters()) == 71_883_403
    state = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    assert len(state) == 344
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.4.attn.1.proj_out.bias": (512,),
        "encoder.mid.1.k.weight": (512, 512, 1, 1),
        "encoder.mid.2.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_blocks.0.res.2.conv1.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.0.attn.2.v.bias": (512,),
        "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quantize.codebook_used": (65536,),
        "quantize.embedding.weight": (16384, 8),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
    }
    for k, shape in expected.items():
        assert state[k] == shape, k
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in state
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in state
    assert not any(".attn." in k for k in state if k.startswith("decoder.conv_blocks.1"))
    assert sum(1 for k in state if k.startswith("decoder.conv_blocks.0.res.") and k.endswith("conv1.weight")) == 3


def test_vq_miniature_roundtrip_shapes_and_normalised_codebook():
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=32, ch=32, ch_mult=(1, 1, 2), z_channels=32, num_res_blocks=1)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    zq, losses, ids = vq.encode(x)
    assert zq.shape == (2, 8, 4, 4) and ids.shape == (2, 16)
    assert torch.allclose(zq.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)  # unit sphere
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(7.0)  # raw norms must not matter: lookups normalise
    assert torch.equal(vq.encode(x)[2], ids)
    img = vq.decode_code(ids, (4, 4))
    assert img.shape == (2, 3, 16, 16)
    assert torch.allclose(img, vq.decode(zq), atol=1e-5)
    assert set(losses) == {"codebook", "commit"}


# ---- 2-D RoPE ----------------------------------------------------------------------------------

def test_rope_table_class_rows_are_zero():
    table = rope_2d_table(4, 64, cls_token_num=1)
    assert table.shape == (17, 32, 2)
    assert torch.count_nonzero(table[0]) == 0
    assert torch.all(table[1:].pow(2).sum(-1).sub(1).abs() < 1e-6)  # cos² + sin² = 1 elsewhere
    # the class token's q and k are wiped by RoPE in every layer
    x = torch.randn(1, 3, 2, 64)
    assert torch.count_nonzero(apply_rope(x, table[:3])[:, 0]) == 0


@pytest.mark.parametrize("head_dim,grid", [(64, 16), (100, 24), (32, 4)])
def test_rope_rows_then_columns(head_dim, grid):
    table = rope_2d_table(grid, head_dim)
    half = head_dim // 2
    inv = torch.tensor([10000.0 ** (-2 * j / half) for j in range(half // 2)])
    assert len(inv) == half // 2  # 16 frequencies for head_dim 64, 25 for 100
    for r, c in [(0, 1), (1, 0), (2, 3), (grid - 1, grid - 2)]:
        t = r * grid + c
        angles = torch.cat([r * inv, c * inv])
        assert torch.allclose(table[1 + t, :, 0], torch.cos(angles), atol=1e-5)
        assert torch.allclose(table[1 + t, :, 1], torch.sin(angles), atol=1e-5)


def test_rope_rotates_adjacent_pairs():
    table = rope_2d_table(4, 32)
    x = torch.zeros(1, 17, 1, 32)
    x[0, :, 0, 6] = 1.0  # element 2j of pair j=3 (a row pair: 3 < 32/4)
    out = apply_rope(x, table)[0, :, 0]
    cos, sin = table[:, 3, 0], table[:, 3, 1]
    assert torch.allclose(out[:, 6], cos) and torch.allclose(out[:, 7], sin)  # interleaved, not rotate_half
    untouched = [i for i in range(32) if i not in (6, 7)]
    assert torch.count_nonzero(out[:, untouched]) == 0
    # rows only move with the grid row: positions in the same row share the first-half angles
    assert torch.allclose(out[1:5, 6], torch.ones(4))  # row 0
    assert not torch.allclose(out[5:9, 6], torch.ones(4))  # row 1


def test_rope_scores_depend_on_relative_2d_offset():
    torch.manual_seed(0)
    grid = 6
    table = rope_2d_table(grid, 64)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)

    def score(rq, cq, rk, ck):
        pq, pk = 1 + rq * grid + cq, 1 + rk * grid + ck
        return (apply_rope(q, table[pq : pq + 1]) * apply_rope(k, table[pk : pk + 1])).sum()

    assert torch.allclose(score(1, 2, 0, 1), score(4, 5, 3, 4), atol=1e-4)
    assert not torch.allclose(score(1, 2, 0, 1), score(1, 2, 1, 0), atol=1e-3)


def test_rmsnorm_fp32_then_type_as_then_weight():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    x = torch.randn(3, 8).to(torch.bfloat16)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    assert torch.equal(norm(x), expected)


# ---- GPT forward and KV cache --------------------------------------------------------------------

def test_mini_gpt_size_matches_upstream_miniature():
    gpt = LlamaGenGPT(MINI)
    assert MINI.ffn_hidden == 512
    assert sum(p.numel() for p in gpt.parameters()) == 542_720
    assert gpt.rope.shape == (17, 32, 2)


def test_teacher_forced_logits_equal_kv_cached_decoding():
    torch.manual_seed(0)
    gpt = LlamaGenGPT(MINI).eval()
    ids = torch.randint(0, 64, (3, 16))
    labels = torch.tensor([1, 10, 7])  # 10 = null class
    with torch.no_grad():
        tf = gpt(ids, labels)
        assert tf.shape == (3, 16, 64) and tf.dtype == torch.float32
        cache = gpt.new_cache(3, 16)
        steps = [gpt.head(gpt.run(gpt.cls_embedding(labels), 0, cache))[:, 0]]
        for i in range(1, 16):
            steps.append(gpt.head(gpt.run(gpt.tok_embeddings(ids[:, i - 1 : i]), i, cache))[:, 0])
    assert (torch.stack(steps, 1) - tf).abs().max() <= 1e-4


def test_kv_cache_block_append_uses_bottom_right_causal_mask():
    torch.manual_seed(1)
    trunk = Trunk(MINI).eval()
    h = torch.randn(2, 12, 128)
    with torch.no_grad():
        full = trunk.run(h, 0)
        cache = KVCache(MINI, 2, 16, "cpu", torch.float32)
        parts = [trunk.run(h[:, :5], 0, cache), trunk.run(h[:, 5:9], 5, cache), trunk.run(h[:, 9:], 9, cache)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_logits_are_causal_and_label_dependent():
    torch.manual_seed(2)
    gpt = LlamaGenGPT(MINI).eval()
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        base = gpt(ids, torch.tensor([3]))
        changed = ids.clone()
        changed[0, 7] = (changed[0, 7] + 1) % 64
        out = gpt(changed, torch.tensor([3]))
        assert torch.allclose(base[:, :8], out[:, :8], atol=1e-6)  # logits[:, i] only see tokens < i
        assert not torch.allclose(base[:, 8:], out[:, 8:], atol=1e-6)
        assert not torch.allclose(base[:, 0], gpt(ids, torch.tensor([4]))[:, 0])
        assert math.isfinite(base.sum().item())
