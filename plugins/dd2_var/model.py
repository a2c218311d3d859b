"""The VAR transformer (next-scale prediction), written from docs/teachers/var.md §1.

State-dict keys and shapes match the released `var_d{16,20,24,30,36}.pth` files, persistent
buffers included (`lvl_1L`, `attn_bias_for_masking`, `blocks.*.attn.zero_k_bias`), so they load
with a strict `load_state_dict`.

`VARBody` is everything up to the last block (it is also the DD2 backbone); `VAR` adds the AdaLN
head. Tensor names: B batch, L tokens (all scales), l tokens of the scales in flight, C width,
D condition width (= C), V vocabulary, H heads, c head dim, Cv codebook width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VARConfig

#: upstream clamps the learnt per-head attention temperature at 100
_MAX_LOG_SCALE = math.log(100.0)


@dataclass
class KVCache:
    """Preallocated keys/values of every block for one sampling run: `(depth, B, H, L, c)` each.

    The L2-normalised keys are cached (as upstream), so a cached step only normalises new keys.
    `length` is the number of positions already written.
    """

    k: Tensor
    v: Tensor
    length: int = 0


class SelfAttention(nn.Module):
    """Multi-head attention with per-head learnt temperature on cosine similarities (qk-L2-norm)."""

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        C, H = cfg.width, cfg.num_heads
        self.num_heads, self.head_dim = H, cfg.head_dim
        self.l2_norm = cfg.attn_l2_norm
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        # keys have no bias; the zero vector is a buffer so that the official file loads strictly
        self.register_buffer("zero_k_bias", torch.zeros(C))
        if self.l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.proj = nn.Linear(C, C)

    def forward(self, x_BlC: Tensor, attn_bias: Tensor | None = None,
                cache: tuple[Tensor, Tensor] | None = None, start: int = 0) -> Tensor:
        """`attn_bias` (1, 1, l, l) for the teacher-forced pass; `cache` = this block's (k, v)
        buffers `(B, H, L, c)`: the new keys/values are written at `[start, start + l)` and the
        queries attend to everything up to there, unmasked (all earlier scales plus their own)."""
        B, l, C = x_BlC.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias).view(B, l, 3, self.num_heads, self.head_dim)
        q_BHlc, k_BHlc, v_BHlc = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            temperature_1H11 = self.scale_mul_1H11.clamp_max(_MAX_LOG_SCALE).exp()
            q_BHlc = F.normalize(q_BHlc, dim=-1) * temperature_1H11
            k_BHlc = F.normalize(k_BHlc, dim=-1)
        if cache is not None:
            cache_k, cache_v = cache
            end = start + l
            cache_k[:, :, start:end] = k_BHlc
            cache_v[:, :, start:end] = v_BHlc
            k_BHlc, v_BHlc = cache_k[:, :, :end], cache_v[:, :, :end]
        out_BHlc = F.scaled_dot_product_attention(q_BHlc, k_BHlc, v_BHlc, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out_BHlc.transpose(1, 2).reshape(B, l, C))


class FFN(nn.Module):
    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        hidden = round(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """One block: AdaLN-modulated attention and FFN with learnt output gates.

    The six modulation vectors come out of `ada_lin` (or `ada_gss` + the shared projection) in the
    order gamma1, gamma2, scale1, scale2, shift1, shift2 — the row order of the official weights.
    """

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        C = cfg.width
        self.shared_aln = cfg.shared_aln
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(cfg)
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond: Tensor) -> tuple[Tensor, ...]:
        """`cond` is `(B, D)` (own AdaLN) or the shared `(B, 1, 6, C)`; returns six `(B, 1, C)`."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)
        C = self.ln_wo_grad.normalized_shape[0]
        return self.ada_lin(cond).view(-1, 1, 6, C).unbind(2)

    def forward(self, x_BlC: Tensor, cond: Tensor, attn_bias: Tensor | None = None,
                cache: tuple[Tensor, Tensor] | None = None, start: int = 0) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond)
        h = self.ln_wo_grad(x_BlC) * (1 + scale1) + shift1
        x_BlC = x_BlC + self.attn(h, attn_bias, cache, start) * gamma1
        h = self.ln_wo_grad(x_BlC) * (1 + scale2) + shift2
        return x_BlC + self.ffn(h) * gamma2


class SharedAdaLin(nn.Linear):
    """d36's one AdaLN projection for all blocks: `(B, D)` → `(B, 1, 6, C)`."""

    def forward(self, cond_BD: Tensor) -> Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


class AdaLNBeforeHead(nn.Module):
    """LN(h)·(1 + scale) + shift with (scale, shift) from the condition."""

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        C = cfg.width
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, h_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, h_BlC.shape[-1]).unbind(2)
        return self.ln_wo_grad(h_BlC) * (1 + scale) + shift


class VARBody(nn.Module):
    """Embeddings + AdaLN blocks: continuous next-scale inputs → last block's features `(B, L, C)`."""

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, L = cfg.width, cfg.num_tokens
        self.num_classes = cfg.num_classes
        spans, begin = [], 0
        for pn in cfg.patch_nums:
            spans.append((begin, begin + pn * pn))
            begin += pn * pn
        self.spans = tuple(spans)

        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(cfg.num_scales, C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])

        level_L = torch.tensor(cfg.scale_of_tokens(), dtype=torch.long)
        self.register_buffer("lvl_1L", level_L[None].clone())
        # block-causal over scales: a query sees keys of its own and of earlier scales
        visible_LL = level_L[:, None] >= level_L[None, :]
        bias_LL = torch.zeros(L, L).masked_fill(~visible_LL, float("-inf"))
        self.register_buffer("attn_bias_for_masking", bias_LL[None, None].contiguous())

    # ---- inputs ------------------------------------------------------------------------------
    def condition(self, labels_B: Tensor) -> tuple[Tensor, Tensor]:
        """(`cond_BD` for the head and the start token, what the blocks read for AdaLN)."""
        cond_BD = self.class_emb(labels_B)
        return cond_BD, self.shared_ada_lin(cond_BD)

    def level_pos(self) -> Tensor:
        """`(1, L, C)`: scale embedding + absolute position of every token."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def start_tokens(self, cond_BD: Tensor) -> Tensor:
        """Input of scale 0 `(B, 1, C)`: the class embedding is also the start-of-sequence token."""
        return cond_BD[:, None] + self.pos_start + self.level_pos()[:, :1]

    def embed_inputs(self, cond_BD: Tensor, x_in_BLCv: Tensor) -> Tensor:
        """Teacher-forcing input `(B, L, C)` from the class and the `(B, L−1, Cv)` next-scale inputs."""
        x_BLC = torch.cat([cond_BD[:, None] + self.pos_start, self.word_embed(x_in_BLCv.float())], dim=1)
        return x_BLC + self.level_pos()

    # ---- passes ------------------------------------------------------------------------------
    def features(self, labels_B: Tensor, x_in_BLCv: Tensor) -> tuple[Tensor, Tensor]:
        """One block-causal parallel pass: (last block's output `(B, L, C)`, `cond_BD`)."""
        cond_BD, cond_blocks = self.condition(labels_B)
        h_BLC = self.embed_inputs(cond_BD, x_in_BLCv)
        for block in self.blocks:
            h_BLC = block(h_BLC, cond_blocks, attn_bias=self.attn_bias_for_masking)
        return h_BLC, cond_BD

    def forward(self, labels_B: Tensor, x_in_BLCv: Tensor) -> Tensor:
        return self.features(labels_B, x_in_BLCv)[0]

    def new_cache(self, batch: int) -> KVCache:
        p = self.pos_1LC
        shape = (self.cfg.depth, batch, self.cfg.num_heads, self.cfg.num_tokens, self.cfg.head_dim)
        return KVCache(torch.empty(shape, dtype=p.dtype, device=p.device),
                       torch.empty(shape, dtype=p.dtype, device=p.device))

    def cached_step(self, x_BlC: Tensor, cond_blocks: Tensor, cache: KVCache) -> Tensor:
        """Run the tokens of one scale through all blocks using and extending the KV cache."""
        start = cache.length
        for i, block in enumerate(self.blocks):
            x_BlC = block(x_BlC, cond_blocks, cache=(cache.k[i], cache.v[i]), start=start)
        cache.length = start + x_BlC.shape[1]
        return x_BlC


class VAR(VARBody):
    """VARBody + `head_nm` (AdaLN) + `head` (linear to V logits)."""

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__(cfg)
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(cfg.width, cfg.vocab_size)

    def get_logits(self, h_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        """fp32 logits `(B, l, V)`; the head runs in fp32 as upstream."""
        return self.head(self.head_nm(h_BlC.float(), cond_BD.float())).float()

    def forward(self, labels_B: Tensor, x_in_BLCv: Tensor) -> Tensor:
        """Teacher-forced logits `(B, L, V)`; no label dropping (that is a training-loop choice)."""
        h_BLC, cond_BD = self.features(labels_B, x_in_BLCv)
        return self.get_logits(h_BLC, cond_BD)

    @torch.no_grad()
    def init_weights(self, *, std: float | None = None, adaln: float = 0.5, adaln_gamma: float = 1e-5,
                     head: float = 0.02, generator: torch.Generator | None = None) -> "VAR":
        """A fresh initialisation for training from scratch or for random-weight tests.

        Small output gates (`adaln_gamma`) make every block start near the identity and a small
        `head` keeps the first logits near uniform; tests pass larger values so that every block
        visibly changes the output.
        """
        C = self.cfg.width
        std = std if std is not None else math.sqrt(1 / C / 3)

        def normal_(t: Tensor, s: float) -> None:
            t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)
                    .clamp_(-2, 2) * s)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                normal_(m.weight, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                normal_(m.weight, std)
        normal_(self.pos_start, std)
        normal_(self.pos_1LC, std)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.cfg.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.cfg.depth))
            if block.attn.l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
            if block.shared_aln:
                normal_(block.ada_gss, std)
                block.ada_gss[:, :, :2].mul_(adaln_gamma)
                block.ada_gss[:, :, 2:].mul_(adaln)
            else:
                w = block.ada_lin[1].weight
                w[: 2 * C].mul_(adaln_gamma)
                w[2 * C :].mul_(adaln)
        if self.cfg.shared_aln:
            w = self.shared_ada_lin[1].weight
            w[: 2 * C].mul_(adaln_gamma)
            w[2 * C :].mul_(adaln)
        self.head.weight.mul_(head)
        self.head_nm.ada_lin[1].weight.mul_(adaln)
        return self
