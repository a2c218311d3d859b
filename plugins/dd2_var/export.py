"""VAR in `dd2 export` bundles: rebuild a generator's backbone and the VQVAE decoder without the teacher.

`VarTeacher.bundle_parts` records the transformer
and tokenizer configs; `build_backbone` / `build_decoder` are the factories a bundle's config.json
names. The engine calls them with random initialisation switched off: every tensor they hold is
in the bundle's weights (the backbone's frozen φ convs and its masks included).
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import Tensor, nn

from dd2cli import bundle_factory

from .config import VARConfig, VQVAEConfig
from .model import VARBody
from .teacher import VarBackbone, _FrozenPhi
from .vqvae import Decoder, MultiScaleQuantizer, split_scales


class VarDecoder(nn.Module):
    """Token ids `(B, L)` → images `(B, 3, H, W)` in `[0, 1]`, exactly as `VarTeacher.decode(ids)`.

    Codebook lookup, Σ_k φ_k(bicubic_up(h_k)) over the scales (f̂), `post_quant_conv`, the decoder,
    clamp to `[-1, 1]`, then `(x + 1) / 2`.
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.patch_nums = tuple(cfg.patch_nums)
        self.quantize = MultiScaleQuantizer(cfg)
        del self.quantize.ema_vocab_hit_SV  # usage statistics of training, not part of decoding
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.decoder = Decoder(cfg)

    def forward(self, ids_BL: Tensor) -> Tensor:
        h_BLd = self.quantize.embedding(ids_BL.long())
        f_hat_BChw = self.quantize.latents_to_fhat(split_scales(h_BLd, self.patch_nums))
        img_pm1 = self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1)
        return ((img_pm1 + 1) / 2).clamp(0, 1).float()


@bundle_factory
def build_backbone(config: dict) -> VarBackbone:
    """A `VarBackbone` of the recorded architecture (weights come from the bundle)."""
    var_cfg, vae_cfg = VARConfig.from_dict(config["var"]), VQVAEConfig.from_dict(config["vae"])
    # `_FrozenPhi` copies the φ convs of a tokenizer: give it a bare quantizer to copy the shapes from
    phi = _FrozenPhi(SimpleNamespace(quantize=MultiScaleQuantizer(vae_cfg)))
    return VarBackbone(VARBody(var_cfg), phi)


@bundle_factory
def build_decoder(config: dict) -> VarDecoder:
    """A `VarDecoder` of the recorded tokenizer (weights come from the bundle)."""
    return VarDecoder(VQVAEConfig.from_dict(config["vae"]))
