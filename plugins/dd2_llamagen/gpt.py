"""LlamaGen's class-conditional GPT, written from the published facts (docs/teachers/llamagen.md §3).

Checkpoint-compatible with the official `c2i_*.pt` files: the module names below produce exactly
the upstream state-dict keys (`cls_embedding.embedding_table.weight`, `tok_embeddings.weight`,
`layers.{i}.attention.wqkv.weight`, ..., `norm.weight`, `output.weight`; no biases, no buffers).

Sequence layout: position 0 holds the class token, position `t + 1` holds image token `t`, so a
teacher-forced pass over `[class, tok_0 .. tok_{n-2}]` yields `logits[:, i]` = p(tok_i | tok_<i).
Every call passes its start position explicitly (there is no train/eval difference in positions).

Sampling uses `KVCache`: one tensor allocated once per sampling call; each step writes only the
new keys/values in place and attends to a view of the filled part, so the cache is never copied
and the loop needs no host synchronisation (positions are Python ints).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: (n_layer, n_head, dim) of the released class-conditional models (`GPT_models` upstream)
GPT_SIZES: dict[str, tuple[int, int, int]] = {
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "3B": (24, 32, 3200),
}


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of `k` that is >= `n`."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a LlamaGen GPT. `block_size` = number of image tokens = grid²."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 16384
    num_classes: int = 1000
    block_size: int = 256
    multiple_of: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    cls_token_num: int = 1

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            # 2-D RoPE splits head_dim/2 rotation pairs evenly between rows and columns
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid")
        if self.cls_token_num != 1:
            raise ValueError("class-conditional LlamaGen uses exactly one class token (cls_token_num=1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        # SwiGLU keeps the parameter count of a 4·dim MLP: 2/3 of 4·dim, rounded up to multiple_of
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @classmethod
    def named(cls, size: str, image_size: int = 256, **overrides) -> "GPTConfig":
        """`GPT-{B,L,XL,XXL,3B}` for an image size (VQ-16 downsamples by 16)."""
        n_layer, n_head, dim = GPT_SIZES[size]
        grid = image_size // 16
        return replace(cls(dim=dim, n_layer=n_layer, n_head=n_head, block_size=grid * grid), **overrides)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- 2-D rotary position embedding ---------------------------------------------------------------

def rope_2d_table(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> Tensor:
    """`(cls_token_num + grid², head_dim/2, 2)` fp32 table of (cos, sin) per rotation pair.

    Pair `j < head_dim/4` rotates by `row · inv[j]`, pair `head_dim/4 + j` by `col · inv[j]`, with
    `inv[j] = base^(-2j / (head_dim/2))`. The class-token rows are all ZERO (cos = sin = 0), as in
    the released models: RoPE wipes q and k of the class token in every layer (its value still flows).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (half/2,)
    t = torch.arange(grid_size, dtype=torch.float32)
    angles_GF = torch.outer(t, inv_freq)  # (grid, half/2)
    rows_GGF = angles_GF[:, None, :].expand(grid_size, grid_size, -1)  # row index is the first axis
    cols_GGF = angles_GF[None, :, :].expand(grid_size, grid_size, -1)
    angles_GGH = torch.cat([rows_GGF, cols_GGF], dim=-1)  # (grid, grid, half)
    table_TH2 = torch.stack([torch.cos(angles_GGH), torch.sin(angles_GGH)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table_TH2], dim=0)


def apply_rope(x_BLHD: Tensor, rope_LH2: Tensor) -> Tensor:
    """Rotate adjacent pairs `(x[2j], x[2j+1])` (interleaved, Meta-llama style) in fp32.

    A pair is the complex number `x[2j] + i·x[2j+1]` and its rotation one complex multiply by
    `cos + i·sin`: one kernel instead of four products and a stack, which matters when decoding
    runs this once per layer per token.
    """
    B, L, H, D = x_BLHD.shape
    x_pairs = x_BLHD.float().reshape(B, L, H, D // 2, 2)
    if x_pairs.stride(-1) != 1 or x_pairs.storage_offset() % 2 or any(st % 2 for st in x_pairs.stride()[:-1]):
        x_pairs = x_pairs.contiguous()  # view_as_complex needs (re, im) adjacent and pair-aligned
    rot_1L1H = torch.view_as_complex(rope_LH2.float().contiguous())[None, :, None, :]
    out = torch.view_as_real(torch.view_as_complex(x_pairs) * rot_1L1H)
    return out.flatten(3).type_as(x_BLHD)


# ---- layers --------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """`x · rsqrt(mean(x²) + eps)` in fp32, cast back, then scaled by `weight`."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KVCache:
    """Keys and values of every layer for one sampling call, allocated once.

    `kv` has shape `(n_layer, 2, B, H, max_len, head_dim)`; layer `l` writes positions
    `[start, start + L)` in place and attends to the view `[:start + L]`.
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype) -> None:
        self.max_len = max_len
        self.kv = torch.empty(cfg.n_layer, 2, batch, cfg.n_head, max_len, cfg.head_dim, device=device, dtype=dtype)

    def update(self, layer: int, start: int, k_BHLD: Tensor, v_BHLD: Tensor) -> tuple[Tensor, Tensor]:
        end = start + k_BHLD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.kv[layer, 0, :, :, start:end] = k_BHLD
        self.kv[layer, 1, :, :, start:end] = v_BHLD
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)


class LayerCache:
    """One layer's part of a `KVCache`. A block is handed its own part, so that every block of a pass is called
    with the same arguments (dd2's memory plan traces one block and replays the others)."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    def update(self, start: int, k_BHLD: Tensor, v_BHLD: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(self.index, start, k_BHLD, v_BHLD)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        # fused projection, split [q | k | v] (n_kv_head == n_head in every released model)
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BLC: Tensor, rope_LH2: Tensor, start: int = 0, cache: LayerCache | None = None) -> Tensor:
        B, L, C = x_BLC.shape
        qkv = self.wqkv(x_BLC).view(B, L, 3 * self.n_head, self.head_dim)
        # q and k heads are rotated in one call (fewer small ops per decoding step)
        qk = apply_rope(qkv[:, :, : 2 * self.n_head], rope_LH2).transpose(1, 2)
        q, k = qk[:, : self.n_head], qk[:, self.n_head :]
        v = qkv[:, :, 2 * self.n_head :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start, k, v)
        if k.shape[2] == L:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        elif L == 1:
            # one new query sees every cached position: no mask needed
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # a block of L queries appended after `start` cached positions (bottom-right causal)
            q_pos = torch.arange(start, start + L, device=x_BLC.device)
            k_pos = torch.arange(start + L, device=x_BLC.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos[None, :] <= q_pos[:, None])
        return self.wo(out.transpose(1, 2).reshape(B, L, C))


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1 x) · w3 x)`."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x_BLC: Tensor, rope_LH2: Tensor, start: int = 0, cache: LayerCache | None = None) -> Tensor:
        h = x_BLC + self.attention(self.attention_norm(x_BLC), rope_LH2, start, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """`embedding_table` with `num_classes + 1` rows; row `num_classes` is the null class."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels_B: Tensor) -> Tensor:
        return self.embedding_table(labels_B)[:, None]  # (B, 1, dim): one class token


class Trunk(nn.Module):
    """Class embedding, blocks and final norm: what the teacher and its backbone copies share.

    `run(h_BLC, start, cache)` applies the blocks to inputs at positions `[start, start + L)` and
    returns the final-normed features. The RoPE table is a non-persistent buffer (the released
    state dicts hold no `freqs_cis`); call `reset_rope()` after materialising from the meta device.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("rope", self._rope_table(), persistent=False)

    def _rope_table(self) -> Tensor:
        c = self.cfg
        return rope_2d_table(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num)

    def reset_rope(self, device=None) -> None:
        """Recompute the RoPE table (after `load_state_dict(assign=True)` from the meta device)."""
        self.rope = self._rope_table().to(device if device is not None else self.norm.weight.device)

    @property
    def max_positions(self) -> int:
        return self.rope.shape[0]

    def run(self, h_BLC: Tensor, start: int = 0, cache: KVCache | None = None) -> Tensor:
        L = h_BLC.shape[1]
        if start + L > self.max_positions:
            raise ValueError(f"positions up to {start + L} exceed the {self.max_positions} RoPE rows")
        rope_LH2 = self.rope[start : start + L]
        for i, layer in enumerate(self.layers):
            h_BLC = layer(h_BLC, rope_LH2, start, None if cache is None else cache.layer(i))
        return self.norm(h_BLC)


class LlamaGenGPT(Trunk):
    """The full class-conditional GPT: trunk + `tok_embeddings` + `output` head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def head(self, f_BLC: Tensor) -> Tensor:
        return self.output(f_BLC).float()

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        w = self.norm.weight
        return KVCache(self.cfg, batch, max_len or self.max_positions, w.device, w.dtype)

    def forward(self, ids_BN: Tensor, labels_B: Tensor) -> Tensor:
        """Teacher-forced logits `(B, N, V)` fp32 for token ids `(B, N)` (the last id is never read)."""
        h_BNC = torch.cat([self.cls_embedding(labels_B), self.tok_embeddings(ids_BN[:, :-1])], dim=1)
        return self.head(self.run(h_BNC, 0))
