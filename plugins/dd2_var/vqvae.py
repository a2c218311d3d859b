"""VAR's multi-scale VQVAE tokenizer, written from docs/teachers/var.md §2.

Key names and shapes match the released `vae_ch160v4096z32.pth` (324 keys, 108,948,355
parameters), so that file loads with a strict `load_state_dict`. Sizes come from `VQVAEConfig`,
so the bundled digits tokenizer uses the same code.

Conventions: images are `[-1, 1]` inside this module (the teacher converts from/to `[0, 1]`);
`f` is the `(B, Cvae, h, w)` latent map with `h = w = patch_nums[-1]`; a scale `si` holds a
`pn×pn` grid of codebook vectors, upsampled bicubically to `h×w` and passed through φ_si before it
is added to the running reconstruction `f̂`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VQVAEConfig

# ---- building blocks -----------------------------------------------------------------------------

def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(groups, channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a (1×1 conv when the width changes) shortcut."""

    def __init__(self, c_in: int, c_out: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # the official file has `nin_shortcut` keys only where the width changes
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, fused [q|k|v] 1×1 conv."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        B, C, H, W = x_BCHW.shape
        q, k, v = self.qkv(self.norm(x_BCHW)).reshape(B, 3, C, H * W).unbind(1)
        # (B, HW, C) tokens; default SDPA scale C^-1/2 is the upstream scale
        out_BNC = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x_BCHW + self.proj_out(out_BNC.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # asymmetric pad (right/bottom) then a stride-2 valid conv, as upstream
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (res blocks), `attn` (maybe empty), then a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None,
                 resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self._resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: Tensor) -> Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[i](h)
        resample = getattr(self, self._resample_name, None)
        return resample(h) if resample is not None else h


class _Mid(nn.Module):
    def __init__(self, channels: int, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.dropout, cfg.norm_groups)
        self.attn_1 = AttnBlock(channels, cfg.norm_groups) if cfg.using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, cfg.dropout, cfg.norm_groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        n_levels = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, c_in = [], cfg.ch
        for lvl, c_out in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.norm_groups))
                c_in = c_out
            last = lvl == n_levels - 1
            attns = [AttnBlock(c_out, cfg.norm_groups) for _ in blocks] if (last and cfg.using_sa) else []
            levels.append(_Level(blocks, attns, None if last else Downsample2x(c_out), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c_in, cfg)
        self.norm_out = _group_norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x_B3HW: Tensor) -> Tensor:
        h = self.conv_in(x_B3HW)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        n_levels = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, cfg)
        # `up` is indexed by level (up.0 = full resolution) but built from the bottom up
        levels: list[nn.Module | None] = [None] * n_levels
        for lvl in reversed(range(n_levels)):
            c_out = widths[lvl]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.norm_groups))
                c_in = c_out
            with_attn = lvl == n_levels - 1 and cfg.using_sa
            attns = [AttnBlock(c_out, cfg.norm_groups) for _ in blocks] if with_attn else []
            levels[lvl] = _Level(blocks, attns, Upsample2x(c_out) if lvl != 0 else None, "upsample")
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z_BChw: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- φ and the multi-scale residual quantizer -----------------------------------------------------

def phi_index_table(num_scales: int, num_phi: int) -> list[int]:
    """Which shared φ conv each scale uses: `argmin |ticks − si/(SN−1)|` in numpy.

    The float64 ties (e.g. 2/9 is exactly between the first two ticks for SN=10) are resolved by
    numpy's argmin exactly as upstream does: [0,0,1,1,1,2,2,3,3,3] for 10 scales and 4 convs.
    """
    if num_phi == 1:
        return [0] * num_scales
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    denom = max(num_scales - 1, 1)
    return [int(np.argmin(np.abs(ticks - si / denom)).item()) for si in range(num_scales)]


class Phi(nn.Conv2d):
    """φ(h) = (1 − r)·h + r·conv3×3(h); keys `weight`, `bias` like a plain conv."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: Tensor) -> Tensor:
        return h_BChw * (1 - self.ratio) + super().forward(h_BChw) * self.ratio


class PhiPartiallyShared(nn.Module):
    """`qresi_ls.{k}`: K φ convs shared over the scales through `phi_index_table`."""

    def __init__(self, channels: int, ratio: float, num_phi: int, num_scales: int) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels, ratio) for _ in range(num_phi)])
        self.index = phi_index_table(num_scales, num_phi)

    def forward(self, si: int, h_BChw: Tensor) -> Tensor:
        return self.qresi_ls[self.index[si]](h_BChw)


def upsample_bicubic(h_BChw: Tensor, size: int) -> Tensor:
    return F.interpolate(h_BChw, size=(size, size), mode="bicubic", align_corners=False)


def downsample_area(f_BChw: Tensor, size: int) -> Tensor:
    return F.interpolate(f_BChw, size=(size, size), mode="area")


def split_scales(x_BLd: Tensor, patch_nums: Sequence[int]) -> list[Tensor]:
    """`(B, L, d)` per-token vectors → per-scale maps `(B, d, pn, pn)` (row-major tokens)."""
    B, L, d = x_BLd.shape
    expected = sum(pn * pn for pn in patch_nums)
    if L != expected:
        raise ValueError(f"expected {expected} tokens for patch_nums {tuple(patch_nums)}, got {L}")
    out, begin = [], 0
    for pn in patch_nums:
        out.append(x_BLd[:, begin : begin + pn * pn].transpose(1, 2).reshape(B, d, pn, pn))
        begin += pn * pn
    return out


PhiFn = Callable[[int, Tensor], Tensor]


def add_scale(f_hat_BChw: Tensor, h_BChw: Tensor, si: int, phi: PhiFn) -> Tensor:
    """f̂ + φ_si(upsample(h)) out of place (the last scale is already full size: no upsampling)."""
    size = f_hat_BChw.shape[-1]
    if h_BChw.shape[-1] != size:
        h_BChw = upsample_bicubic(h_BChw, size)
    return f_hat_BChw + phi(si, h_BChw)


def var_input_from_scales(h_scales: Sequence[Tensor], phi: PhiFn, patch_nums: Sequence[int]) -> Tensor:
    """Teacher-forcing input `(B, L − 1, d)`: for scale k ≥ 1, area_down(f̂ of scales < k, pn_k).

    `h_scales[k]` are the `(B, d, pn_k, pn_k)` vectors of scale k — codebook rows for token ids, or
    any continuous vectors (the chain is differentiable). The last scale is not read.
    """
    B, d = h_scales[0].shape[:2]
    size = patch_nums[-1]
    f_hat = h_scales[0].new_zeros(B, d, size, size)
    inputs = []
    for si in range(len(patch_nums) - 1):
        f_hat = add_scale(f_hat, h_scales[si], si, phi)
        pn_next = patch_nums[si + 1]
        inputs.append(downsample_area(f_hat, pn_next).flatten(2).transpose(1, 2))
    if not inputs:
        return h_scales[0].new_zeros(B, 0, d)
    return torch.cat(inputs, dim=1)


class MultiScaleQuantizer(nn.Module):
    """`VectorQuantizer2`: raw codebook (no normalisation) + φ-refined multi-scale residuals."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.patch_nums = tuple(cfg.patch_nums)
        self.beta = cfg.beta
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiPartiallyShared(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi, len(cfg.patch_nums))
        # training statistics only, but part of the official state dict
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))

    def phi(self, si: int, h_BChw: Tensor) -> Tensor:
        return self.quant_resi(si, h_BChw)

    def lookup_scales(self, ids_BL: Tensor) -> list[Tensor]:
        """Token ids `(B, L)` → raw codebook vectors per scale `(B, d, pn, pn)`."""
        return split_scales(self.embedding(ids_BL), self.patch_nums)

    def latents_to_fhat(self, h_scales: Sequence[Tensor]) -> Tensor:
        """`embed_to_fhat`: the sum over all scales of φ_si(upsample(h_si))."""
        B, d = h_scales[0].shape[:2]
        size = self.patch_nums[-1]
        f_hat = h_scales[0].new_zeros(B, d, size, size)
        for si, h in enumerate(h_scales):
            f_hat = add_scale(f_hat, h, si, self.phi)
        return f_hat

    def var_input(self, h_scales: Sequence[Tensor]) -> Tensor:
        return var_input_from_scales(h_scales, self.phi, self.patch_nums)

    def next_ar_input(self, si: int, f_hat_BChw: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor | None]:
        """One AR step: add scale si to f̂, return (f̂, input map of scale si+1 or None at the end)."""
        f_hat_BChw = add_scale(f_hat_BChw, h_BChw, si, self.phi)
        if si == len(self.patch_nums) - 1:
            return f_hat_BChw, None
        return f_hat_BChw, downsample_area(f_hat_BChw, self.patch_nums[si + 1])

    def _nearest(self, z_NC: Tensor) -> Tensor:
        w_VC = self.embedding.weight
        dist_NV = (w_VC * w_VC).sum(-1)[None] - 2 * z_NC @ w_VC.T  # ‖z‖² does not move the argmin
        return dist_NV.argmin(-1)

    def quantize(self, f_BChw: Tensor) -> tuple[list[Tensor], Tensor]:
        """Residual quantisation of `f`: (ids per scale `(B, pn²)`, f̂) with no gradient path."""
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach()
        f_hat = torch.zeros_like(f_rest)
        ids = []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = downsample_area(f_rest, pn) if si != last else f_rest
            idx_N = self._nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            ids.append(idx_N.view(B, pn * pn))
            h = self.embedding(idx_N).view(B, pn, pn, C).permute(0, 3, 1, 2)
            if si != last:
                h = upsample_bicubic(h, H)
            h = self.phi(si, h)
            f_hat = f_hat + h
            f_rest = f_rest - h
        return ids, f_hat

    def forward(self, f_BChw: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Training pass: (straight-through f̂, VQ loss, ids per scale).

        The loss averages over scales the codebook term ‖f̂ − sg(f)‖² (trains the codebook and φ)
        plus β·‖sg(f̂) − f‖² (commits the encoder), measured on the running f̂ after each scale.
        """
        B, C, H, W = f_BChw.shape
        f_sg = f_BChw.detach()
        f_rest = f_sg
        f_hat = torch.zeros_like(f_sg)
        loss = f_BChw.new_zeros(())
        ids = []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = downsample_area(f_rest, pn) if si != last else f_rest
            with torch.no_grad():
                idx_N = self._nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            ids.append(idx_N.view(B, pn * pn))
            h = self.embedding(idx_N).view(B, pn, pn, C).permute(0, 3, 1, 2)
            if si != last:
                h = upsample_bicubic(h, H)
            h = self.phi(si, h)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat, f_sg) + self.beta * F.mse_loss(f_hat.detach(), f_BChw)
        loss = loss / len(self.patch_nums)
        f_hat_st = f_BChw + (f_hat - f_BChw).detach()  # straight-through to the encoder
        return f_hat_st, loss, ids


class VQVAE(nn.Module):
    """Encoder, decoder, `quant_conv` / `post_quant_conv` and the multi-scale quantizer."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.cfg.patch_nums

    def img_to_f(self, img_pm1_B3HW: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(img_pm1_B3HW))

    def fhat_to_img(self, f_hat_BChw: Tensor) -> Tensor:
        """f̂ → image in `[-1, 1]`."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1)

    def img_to_ids(self, img_pm1_B3HW: Tensor) -> Tensor:
        """Images in `[-1, 1]` → token ids `(B, L)` (scales concatenated)."""
        ids, _ = self.quantize.quantize(self.img_to_f(img_pm1_B3HW))
        return torch.cat(ids, dim=1)

    def latents_to_img(self, h_BLd: Tensor) -> Tensor:
        """Per-token codebook-space vectors `(B, L, d)` → image in `[-1, 1]`."""
        return self.fhat_to_img(self.quantize.latents_to_fhat(split_scales(h_BLd, self.patch_nums)))

    def forward(self, img_pm1_B3HW: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Training: (reconstruction in `[-1, 1]`-ish, VQ loss, ids per scale)."""
        f_hat, vq_loss, ids = self.quantize(self.img_to_f(img_pm1_B3HW))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, ids
