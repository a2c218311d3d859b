"""LlamaGen in `dd2 export` bundles: rebuild a generator's backbone and the VQ decoder without the teacher.

`bundle_parts(teacher, backbone)` (what `LlamaGenTeacher.bundle_parts` returns) records the GPT
config, the continuous input adapter's size and the tokenizer config; `build_backbone` /
`build_decoder` are the factories a bundle's config.json names. The engine calls them with random
initialisation switched off (the bundle holds every weight); the RoPE table, which no state dict
holds, is computed as the teacher computes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dd2cli.errors import DD2Error
from dd2cli.export import BundleParts, ModuleRecipe, bundle_factory
from dd2cli.teacher import Backbone

from .gpt import GPTConfig, Trunk
from .teacher import ContinuousInputAdapter, LlamaGenBackbone, LlamaGenTeacher
from .vq import VQConfig, VQModel

#: the tokenizer keys the decoder needs (the encoder, `quant_conv` and usage history stay behind)
_DECODER_PREFIXES = ("decoder.", "post_quant_conv.", "quantize.embedding.")
#: images per decoder pass, as `LlamaGenTeacher.decode` (bounds the memory of big tokenizers)
DECODE_CHUNK = 32


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


def bundle_parts(teacher: LlamaGenTeacher, backbone: LlamaGenBackbone) -> BundleParts:
    """The configs, decoder weights and codebook a bundle needs for a generator built on `backbone`."""
    if not isinstance(backbone, LlamaGenBackbone):
        raise DD2Error(f"Teacher '{teacher.variant_name}' exports generators whose backbone is a LlamaGenBackbone, "
                       f"not a {type(backbone).__name__}; export a run made with this teacher.")
    adapter = backbone.adapter
    if not isinstance(adapter, ContinuousInputAdapter):
        raise DD2Error(f"The backbone reads latents through a {type(adapter).__name__}, which dd2 bundles cannot "
                       f"rebuild; only the ContinuousInputAdapter of dd2_llamagen is supported.")
    arch = {"gpt": backbone.trunk.cfg.as_dict(),
            "adapter": {"latent_dim": adapter.fc1.in_features, "hidden": adapter.fc1.out_features,
                        "dim": adapter.fc2.out_features}}
    vq_state = teacher.vq.state_dict()
    decoder_state = {f"vq.{k}": v for k, v in vq_state.items() if k.startswith(_DECODER_PREFIXES)}
    return BundleParts(
        backbone=ModuleRecipe("dd2_llamagen.export:build_backbone", arch),
        decoder=ModuleRecipe("dd2_llamagen.export:build_decoder",
                             {"vq": teacher.vq.cfg.as_dict(), "grid": teacher.grid, "chunk": DECODE_CHUNK},
                             decoder_state),
        codebook_Vd=teacher.codebook(),
    )


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
