"""LlamaGen's VQ tokenizer (VQ-16), written from the published facts (docs/teachers/llamagen.md §4).

Checkpoint-compatible with `vq_ds16_c2i.pt` (344 keys): `encoder.conv_blocks.{l}.res.{b}` /
`.attn.{b}` / `.downsample.conv`, `mid.{0,1,2}` (Res, Attn, Res), attention blocks with separate
`q`/`k`/`v` 1×1 convs, the decoder's `conv_blocks` ordered from LOW to HIGH resolution,
`quant_conv` (z → d, 1×1), `post_quant_conv`, and the quantizer's `codebook_used` buffer.

Unlike upstream, the base width `ch` is configurable (official 128) so that a miniature runs the
same code. Every codebook lookup uses the L2-normalised rows: the token latent space is the unit
sphere in R^d. Images are in [-1, 1] here; the teacher converts from/to [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: size of the `codebook_used` usage-history buffer in the released tokenizer
USAGE_HISTORY = 65536


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    commit_beta: float = 0.25  # weight of the commitment loss (training only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        for m in self.ch_mult:
            if (self.ch * m) % 32:
                raise ValueError(f"channel count {self.ch * m} is not a multiple of 32 (GroupNorm groups)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w grid, separate q/k/v 1×1 convs, scale c^-½."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        B, C, H, W = x_BCHW.shape
        h = self.norm(x_BCHW)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C)
        return x_BCHW + self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad keeps an exact /2


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: `res.{b}`, optional `attn.{b}` after each res block, optional resampler."""

    def __init__(self, c_in: int, c_out: int, n_res: int, with_attn: bool, resample: type | None) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_res):
            self.res.append(ResnetBlock(c_in, c_out))
            c_in = c_out
            if with_attn:
                self.attn.append(AttnBlock(c_out))
        if resample is Downsample:
            self.downsample = Downsample(c_out)
        elif resample is Upsample:
            self.upsample = Upsample(c_out)

    def forward(self, h: Tensor) -> Tensor:
        for b, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[b](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        last = len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            self.conv_blocks.append(_Level(c_in, c_out, cfg.num_res_blocks, level == last,
                                           Downsample if level != last else None))
            c_in = c_out
        self.mid = _mid(c_in)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """`conv_blocks.0` is the lowest-resolution (widest) level, the last one the image resolution."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        last = len(cfg.ch_mult) - 1
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in)
        self.conv_blocks = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            c_out = cfg.ch * cfg.ch_mult[last - i]
            self.conv_blocks.append(_Level(c_in, c_out, cfg.num_res_blocks + 1, i == 0,
                                           Upsample if i != last else None))
            c_in = c_out
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest L2-normalised codebook row for L2-normalised inputs (= maximum cosine)."""

    def __init__(self, codebook_size: int, dim: int, commit_beta: float = 0.25) -> None:
        super().__init__()
        self.commit_beta = commit_beta
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # usage history of the last 65536 assigned ids (kept for checkpoint compatibility)
        self.register_buffer("codebook_used", torch.zeros(USAGE_HISTORY))

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def nearest(self, z_Md: Tensor) -> Tensor:
        """Ids `(M,)` of the nearest normalised codebook rows for vectors `(M, d)` (normalised here)."""
        z_Md = F.normalize(z_Md, dim=-1)
        code_Vd = self.codebook()
        # ‖z‖² is constant (=1); argmin ‖z−c‖² = argmin (‖c‖² − 2⟨z,c⟩)
        return ((code_Vd * code_Vd).sum(-1)[None] - 2 * z_Md @ code_Vd.T).argmin(-1)

    def forward(self, z_BdHW: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """`(z_q straight-through (B,d,H,W), {"codebook": .., "commit": ..}, ids (B·H·W,) raster)`."""
        B, d, H, W = z_BdHW.shape
        z_Md = F.normalize(z_BdHW.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
        ids_M = self.nearest(z_Md)
        zq_Md = self.codebook()[ids_M]
        losses = {
            "codebook": F.mse_loss(zq_Md, z_Md.detach()),
            "commit": self.commit_beta * F.mse_loss(z_Md, zq_Md.detach()),
        }
        if self.training:
            with torch.no_grad():
                m = min(ids_M.numel(), USAGE_HISTORY)
                self.codebook_used.copy_(torch.cat([self.codebook_used[m:], ids_M[-m:].float()]))
        zq_Md = z_Md + (zq_Md - z_Md).detach()  # straight-through gradient to the encoder
        return zq_Md.reshape(B, H, W, d).permute(0, 3, 1, 2), losses, ids_M


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.commit_beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def codebook(self) -> Tensor:
        """`(V, d)` L2-normalised codebook."""
        return self.quantize.codebook()

    def encode(self, x_B3HW: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Images in [-1, 1] → `(z_q (B,d,h,w), losses, ids (B, h·w) raster order)`."""
        zq, losses, ids_M = self.quantize(self.quant_conv(self.encoder(x_B3HW)))
        return zq, losses, ids_M.reshape(x_B3HW.shape[0], -1)

    def decode(self, zq_BdHW: Tensor) -> Tensor:
        """Latents `(B, d, h, w)` → images roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(zq_BdHW))

    def decode_code(self, ids_BN: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Token ids `(B, h·w)` raster order → images roughly in [-1, 1]."""
        h, w = grid_hw
        zq_BhwD = self.codebook()[ids_BN].reshape(ids_BN.shape[0], h, w, -1)
        return self.decode(zq_BhwD.permute(0, 3, 1, 2))

    def forward(self, x_B3HW: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        zq, losses, _ = self.encode(x_B3HW)
        return self.decode(zq), losses
