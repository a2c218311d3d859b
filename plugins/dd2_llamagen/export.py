"""LlamaGen in `dd2 export` bundles: rebuild a generator's backbone and the VQ decoder without the teacher.

`LlamaGenTeacher.bundle_parts` records the GPT
config, the continuous input adapter's size and the tokenizer config; `build_backbone` /
`build_decoder` are the factories a bundle's config.json names. The engine calls them with random
initialisation switched off (the bundle holds every weight); the RoPE table, which no state dict
holds, is computed as the teacher computes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dd2cli import Backbone, bundle_factory

from .gpt import GPTConfig, Trunk
from .teacher import DECODE_CHUNK, ContinuousInputAdapter, LlamaGenBackbone
from .vq import VQConfig, VQModel


class LlamaGenDecoder(nn.Module):
    """Token ids `(B, h·w)` → images `(B, 3, H, W)` in `[0, 1]`, exactly as `LlamaGenTeacher.decode(ids)`.

    Normalised codebook rows, `post_quant_conv`, the VQ decoder, then `(x + 1) / 2` clamped; in
    chunks of `chunk` images like the teacher (one pass inside `torch.export`, whose batch is symbolic).
    """

    def __init__(self, cfg: VQConfig, grid: int, chunk: int = DECODE_CHUNK) -> None:
        super().__init__()
        self.grid, self.chunk = grid, chunk
        self.vq = VQModel(cfg)
        del self.vq.encoder, self.vq.quant_conv  # decoding never reads them
        del self.vq.quantize.codebook_used  # usage history of tokenizer training

    def forward(self, ids_BN: Tensor) -> Tensor:
        ids_BN = ids_BN.long()
        if torch.compiler.is_exporting():
            parts = [ids_BN]
        else:
            parts = [ids_BN[s : s + self.chunk] for s in range(0, len(ids_BN), self.chunk)]
        out = [self.vq.decode_code(part, (self.grid, self.grid)) for part in parts]
        return ((torch.cat(out).float() + 1) / 2).clamp(0, 1)


class _BundleBackbone(LlamaGenBackbone):
    """`LlamaGenBackbone` (same keys, same forward) around a fresh trunk instead of a GPT's copy.

    The parent's constructor copies a whole GPT through the meta device, whose reference kernels
    import torch._dynamo: 2.5 s of every cold `load_generator`, for weights the bundle replaces anyway.
    """

    def __init__(self, cfg: GPTConfig, adapter: ContinuousInputAdapter) -> None:
        Backbone.__init__(self)
        self.trunk = Trunk(cfg)  # its RoPE table (in no state dict) is computed here, as the teacher's
        self.adapter = adapter
        self.feature_dim = cfg.dim


@bundle_factory
def build_backbone(config: dict) -> LlamaGenBackbone:
    """A `LlamaGenBackbone` of the recorded architecture (weights come from the bundle)."""
    a = config["adapter"]
    return _BundleBackbone(GPTConfig(**config["gpt"]), ContinuousInputAdapter(a["latent_dim"], a["dim"], a["hidden"]))


@bundle_factory
def build_decoder(config: dict) -> LlamaGenDecoder:
    """A `LlamaGenDecoder` of the recorded tokenizer (weights come from the bundle)."""
    return LlamaGenDecoder(VQConfig(**config["vq"]), int(config["grid"]), int(config.get("chunk", DECODE_CHUNK)))
