"""VAR seen through the DD2 teacher contract (`dd2cli.teacher`), its backbone, and the loaders.

- `VarTeacher`: teacher-forced logits for ids or continuous latents in one pass, VAR's guidance
  ramp and top-k/top-p rule, the KV-cached next-scale sampler (with prefix continuation), decode /
  encode through the multi-scale VQVAE.
- `VarBackbone`: a trainable copy of the transformer without `head_nm`/`head`, reading continuous
  per-token latents through the same φ / f̂ / area-downsample chain as the teacher.
- `load_variant`: builds a teacher from official `.pth` files or the bundled safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2cli import (
    Backbone,
    BundleParts,
    CheckpointMismatchError,
    DD2Error,
    FileFormatError,
    ModuleRecipe,
    SamplingSettings,
    Teacher,
    TeacherSpec,
    Variant,
    check_state_dict,
    fingerprint_file,
    load_foreign_checkpoint,
    load_safetensors,
    read_json,
    sha256_file,
)

from .config import VARConfig, VQVAEConfig, vae_config, var_config
from .model import VAR, VARBody
from .vqvae import VQVAE, split_scales, var_input_from_scales

#: the tokenizer keys a bundle's decoder needs (the encoder and `quant_conv` stay behind)
_DECODER_PREFIXES = ("quantize.", "post_quant_conv.", "decoder.")
#: training statistics of the quantizer: not needed to decode
_UNUSED = ("quantize.ema_vocab_hit_SV",)
#: weight files up to this size are identified by a full sha256; bigger ones by a fingerprint
_FULL_HASH_LIMIT = 64 << 20


# ---- sampling rules ----------------------------------------------------------------------------

def filter_logits(logits_BNV: Tensor, settings: SamplingSettings) -> Tensor:
    """Temperature, then VAR's `sample_with_top_k_top_p_` masks, out of place; removed → −inf.

    top-k keeps every logit ≥ the k-th largest; top-p sorts ascending and removes the tokens whose
    ascending cumulative probability is ≤ 1 − top_p, never the arg-max. `top_p >= 1` removes
    nothing with non-zero probability, so it is skipped.
    """
    logits = logits_BNV.float()
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    V = logits.shape[-1]
    if 0 < settings.top_k < V:
        # selection, not a sort of k values: the same threshold as topk(k).values[..., -1:], faster
        kth_BN1 = logits.kthvalue(V - settings.top_k + 1, dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < kth_BN1, float("-inf"))
    if 0 < settings.top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - settings.top_p)
        remove_sorted[..., -1] = False  # the most likely token always survives
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _sample_ids(logits_BlV: Tensor, generator: torch.Generator | None) -> Tensor:
    B, l, V = logits_BlV.shape
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, 1, generator=generator).view(B, l)


# ---- backbone ------------------------------------------------------------------------------------

class _FrozenPhi(nn.Module):
    """A copy of the tokenizer's φ convs as buffers: part of the input chain, never trained."""

    def __init__(self, vae: VQVAE) -> None:
        super().__init__()
        convs = vae.quantize.quant_resi.qresi_ls
        self.register_buffer("weight_KCC33", torch.stack([c.weight.detach() for c in convs]).clone())
        self.register_buffer("bias_KC", torch.stack([c.bias.detach() for c in convs]).clone())
        self.ratios = [c.ratio for c in convs]
        self.index = list(vae.quantize.quant_resi.index)

    def forward(self, si: int, h_BChw: Tensor) -> Tensor:
        k = self.index[si]
        conv = F.conv2d(h_BChw, self.weight_KCC33[k], self.bias_KC[k], padding=1)
        return h_BChw * (1 - self.ratios[k]) + conv * self.ratios[k]


class VarBackbone(Backbone):
    """Teacher transformer without its head; `forward(z_BNd, labels_B) -> f_BNC` (last block output).

    `z` (codebook vectors, generated latents or noise) becomes the transformer input exactly as
    in the teacher: per scale k, area_down(Σ_{s<k} φ_s(bicubic_up(z_s)), pn_k). With the
    block-causal mask, `f_i` depends on the label and on `z` of scales < scale(i) only.
    """

    def __init__(self, body: VARBody, phi: _FrozenPhi) -> None:
        super().__init__()
        self.body = body
        self.phi = phi
        self.patch_nums = tuple(body.cfg.patch_nums)
        self.feature_dim = body.cfg.width

    def forward(self, z_BNd: Tensor, labels_B: Tensor) -> Tensor:
        x_in = var_input_from_scales(split_scales(z_BNd.float(), self.patch_nums), self.phi, self.patch_nums)
        return self.body(labels_B, x_in)


# ---- teacher -------------------------------------------------------------------------------------

class VarTeacher(Teacher):
    """A frozen VAR transformer + its VQVAE. Step of a token = its scale index."""

    def __init__(self, var: VAR, vae: VQVAE, *, variant_name: str = "var",
                 stage1: SamplingSettings = SamplingSettings(),
                 target: SamplingSettings = SamplingSettings(),
                 evaluation: SamplingSettings = SamplingSettings(),
                 weight_files: Mapping[str, Path] | None = None) -> None:
        super().__init__()
        cfg = var.cfg
        if tuple(vae.cfg.patch_nums) != tuple(cfg.patch_nums):
            raise ValueError(f"VAE patch_nums {vae.cfg.patch_nums} != VAR patch_nums {cfg.patch_nums}")
        if vae.cfg.vocab_size != cfg.vocab_size or vae.cfg.z_channels != cfg.z_channels:
            raise ValueError("VAE vocabulary / codebook width differ from the VAR transformer's")
        self.var = var.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.variant_name = variant_name
        self._weight_files = dict(weight_files or {})
        self._identity_cache: dict | None = None
        self.spec = TeacherSpec(
            num_tokens=cfg.num_tokens,
            vocab_size=cfg.vocab_size,
            latent_dim=cfg.z_channels,
            num_classes=cfg.num_classes,
            null_class=cfg.num_classes,
            steps=cfg.scale_of_tokens(),
            image_size=vae.cfg.image_size,
            stage1=stage1,
            target=target,
            evaluation=evaluation,
        )

    def train(self, mode: bool = True) -> "VarTeacher":
        """The teacher stays in eval mode (it has no dropout, but keep it unambiguous)."""
        return super().train(False)

    # ---- latent space -------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        """The raw codebook `quantize.embedding.weight` `(V, Cvae)` (VAR does not normalise it)."""
        return self.vae.quantize.embedding.weight

    def _latents(self, x_BN: Tensor) -> Tensor:
        if x_BN.shape[1] != self.spec.num_tokens:
            raise ValueError(f"VAR expects all {self.spec.num_tokens} tokens, got {x_BN.shape[1]}")
        if x_BN.dtype in (torch.int64, torch.int32):
            return self.vae.quantize.embedding(x_BN.long())
        return x_BN.float()

    # ---- teacher-forced logits ------------------------------------------------------------------
    def logits(self, x_BN: Tensor, labels_B: Tensor) -> Tensor:
        """`(B, L, V)` fp32: the input of scale k is area_down(f̂ of scales < k) (`idxBl_to_var_input`)."""
        h_scales = split_scales(self._latents(x_BN), self.var.cfg.patch_nums)
        return self.var(labels_B.long(), self.vae.quantize.var_input(h_scales))

    def _ramp_1L1(self) -> Tensor:
        """Guidance weight per position divided by cfg: scale(j) / (num_scales − 1)."""
        steps = max(self.var.cfg.num_scales - 1, 1)
        return (self.var.lvl_1L.float() / steps)[..., None]

    def guide(self, logits_c_BNV: Tensor, logits_u_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        """VAR's linear ramp: t_j = cfg·scale(j)/(S−1), then (1 + t)·l_c − t·l_u."""
        if not self.uses_guidance(settings):
            return logits_c_BNV
        t_1L1 = settings.cfg * self._ramp_1L1()
        return (1 + t_1L1) * logits_c_BNV - t_1L1 * logits_u_BNV

    def filter_logits(self, logits_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        return filter_logits(logits_BNV, settings)

    def uses_guidance(self, settings: SamplingSettings) -> bool:
        return settings.cfg > 0

    # ---- AR sampler ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels_B, settings, prefix_BN=None, start_step=0, generator=None, return_logits=False):
        """`autoregressive_infer_cfg`: one cached transformer pass per scale.

        Scales `< start_step` take their tokens (ids or continuous latents) from `prefix_BN`; the
        cache is still filled with them. With guidance the batch is doubled to [labels; null] and
        both halves read the guided sample of the previous scales.
        """
        var, quant = self.var, self.vae.quantize
        cfg = var.cfg
        num_scales = cfg.num_scales
        if not 0 <= start_step <= num_scales:
            raise ValueError(f"start_step must be in [0, {num_scales}], got {start_step}")
        if start_step > 0 and prefix_BN is None:
            raise ValueError("start_step > 0 needs prefix_BN")
        labels_B = labels_B.to(self.device).long()
        B = labels_B.shape[0]
        guided = self.uses_guidance(settings)
        prefix_h_BLd = prefix_ids_BL = None
        if start_step > 0:
            prefix_BN = prefix_BN.to(self.device)
            prefix_h_BLd = self._latents(prefix_BN)
            prefix_ids_BL = self.as_tokens(prefix_BN)

        # 1. condition: [labels; null] with guidance, else labels; the class embedding is also
        #    the start token
        labels_in = torch.cat([labels_B, torch.full_like(labels_B, cfg.num_classes)]) if guided else labels_B
        cond_BD, cond_blocks = var.condition(labels_in)
        level_pos_1LC = var.level_pos()
        x_BlC = var.start_tokens(cond_BD)
        cache = var.new_cache(labels_in.shape[0])

        size = cfg.patch_nums[-1]
        f_hat = torch.zeros(B, cfg.z_channels, size, size, device=self.device)
        tokens_BL = torch.empty(B, cfg.num_tokens, dtype=torch.long, device=self.device)
        logits_BLV = (torch.full((B, cfg.num_tokens, cfg.vocab_size), float("nan"), device=self.device)
                      if return_logits else None)
        for si, (begin, end) in enumerate(var.spans):
            pn = cfg.patch_nums[si]
            # 2. one cached pass over the tokens of this scale
            h_BlC = var.cached_step(x_BlC, cond_blocks, cache)
            if si < start_step:
                # 3a. forced scale: take the prefix (logits only if asked for)
                if return_logits:
                    logits_BLV[:, begin:end] = var.get_logits(h_BlC[:B], cond_BD[:B])
                ids_Bl = prefix_ids_BL[:, begin:end]
                h_Bld = prefix_h_BLd[:, begin:end]
            else:
                # 3b. guided, filtered, sampled
                all_logits = var.get_logits(h_BlC, cond_BD)
                logits_c = all_logits[:B]
                if return_logits:
                    logits_BLV[:, begin:end] = logits_c
                if guided:
                    t = settings.cfg * si / max(num_scales - 1, 1)
                    logits_c = (1 + t) * logits_c - t * all_logits[B:]
                ids_Bl = _sample_ids(self.filter_logits(logits_c, settings), generator)
                h_Bld = quant.embedding(ids_Bl)
            tokens_BL[:, begin:end] = ids_Bl
            # 4. add the scale to f̂; the next scale reads f̂ area-downsampled to its grid
            h_BChw = h_Bld.transpose(1, 2).reshape(B, cfg.z_channels, pn, pn)
            f_hat, next_BChw = quant.next_ar_input(si, f_hat, h_BChw)
            if next_BChw is not None:
                nb, ne = var.spans[si + 1]
                x_BlC = var.word_embed(next_BChw.flatten(2).transpose(1, 2)) + level_pos_1LC[:, nb:ne]
                if guided:
                    x_BlC = torch.cat([x_BlC, x_BlC])
        return (tokens_BL, logits_BLV) if return_logits else tokens_BL

    # ---- images -------------------------------------------------------------------------------
    def decode(self, x_BN: Tensor) -> Tensor:
        """Token ids or latents → images `(B, 3, H, W)` in `[0, 1]` (`fhat_to_img`, then (x+1)/2)."""
        img_pm1 = self.vae.latents_to_img(self._latents(x_BN.to(self.device)))
        return ((img_pm1 + 1) / 2).clamp(0, 1).float()

    @torch.no_grad()
    def encode(self, images_B3HW: Tensor) -> Tensor:
        """Images in `[0, 1]` `(B, 3, H, W)` at `spec.image_size` → token ids `(B, L)`."""
        size = self.spec.image_size
        if tuple(images_B3HW.shape[-2:]) != (size, size) or images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            raise DD2Error(f"Teacher '{self.variant_name}' encodes (B, 3, {size}, {size}) images, got "
                           f"{tuple(images_B3HW.shape)}; resize them to {size}×{size} first.")
        return self.vae.img_to_ids(images_B3HW.to(self.device).float() * 2 - 1)

    # ---- trainable copy -------------------------------------------------------------------------
    def new_backbone(self) -> VarBackbone:
        """A trainable copy of everything but `head_nm`/`head`, plus frozen copies of the φ convs."""
        with torch.device("meta"):
            body = VARBody(self.var.cfg)
        state = {k: v.detach().clone() for k, v in self.var.state_dict().items()
                 if not k.startswith(("head_nm.", "head."))}
        body.load_state_dict(state, strict=True, assign=True)
        return VarBackbone(body.train().requires_grad_(True), _FrozenPhi(self.vae))

    # ---- provenance ---------------------------------------------------------------------------
    def identity(self) -> dict:
        if self._identity_cache is None:
            files = {}
            for key, path in sorted(self._weight_files.items()):
                path = Path(path)
                if path.stat().st_size <= _FULL_HASH_LIMIT:
                    files[key] = {"file": path.name, "sha256": sha256_file(path)}
                else:
                    files[key] = {"file": path.name, "fingerprint": fingerprint_file(path)}
            self._identity_cache = {**super().identity(), "family": "var", "weights": files}
        return dict(self._identity_cache)

    # ---- export -------------------------------------------------------------------------------
    def bundle_parts(self, backbone: VarBackbone) -> BundleParts:
        """Configs, decoder weights and codebook for `dd2 export`; `dd2_var.export` holds the factories."""
        if not isinstance(backbone, VarBackbone):
            raise DD2Error(f"Teacher '{self.variant_name}' exports generators whose backbone is a VarBackbone, not a "
                           f"{type(backbone).__name__}; export a run made with this teacher.")
        vae_cfg = self.vae.cfg.to_dict()
        decoder_state = {k: v for k, v in self.vae.state_dict().items()
                         if k.startswith(_DECODER_PREFIXES) and k not in _UNUSED}
        return BundleParts(
            backbone=ModuleRecipe("dd2_var.export:build_backbone", {"var": backbone.body.cfg.to_dict(), "vae": vae_cfg}),
            decoder=ModuleRecipe("dd2_var.export:build_decoder", {"vae": vae_cfg}, decoder_state),
            codebook_Vd=self.codebook(),
        )


# ---- loading -------------------------------------------------------------------------------------

def infer_depth(state: Mapping[str, Tensor], width_per_block: int | None = 64) -> int | None:
    """The depth a VAR state dict looks like.

    Official configs have width = 64·depth, so `class_emb` width / 64 names the depth even for a
    truncated file; for configs without such a rule (`width_per_block=None`) count the blocks.
    """
    w = state.get("class_emb.weight")
    if width_per_block and w is not None and w.ndim == 2 and w.shape[1] % width_per_block == 0:
        return w.shape[1] // width_per_block
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(blocks) + 1 if blocks else None


def _load_file(path: Path, what: str) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        state, _ = load_safetensors(path)
    else:
        state = load_foreign_checkpoint(path, unwrap=(), what=what)
    # the released files are fp32; cast anything else so the teacher runs in one dtype
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _build(module_cls, cfg, state: Mapping[str, Tensor], *, variant: str, file: str) -> nn.Module:
    """Build on the meta device and adopt the loaded tensors (no second copy of the weights)."""
    with torch.device("meta"):
        module = module_cls(cfg)
    check_state_dict(module, state, variant=variant, file=file)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def load_checkpoints(var_path: Path, vae_path: Path, var_cfg: VARConfig, vae_cfg: VQVAEConfig, *,
                     variant_name: str) -> tuple[VAR, VQVAE]:
    """Strictly load a VAR transformer and its VQVAE (raw state dicts, `.pth` or `.safetensors`).

    A transformer file of another depth is refused with the depth it looks like; a tokenizer file
    passed as the transformer is refused with a hint. Every other mismatch names the first key.
    """
    var_path, vae_path = Path(var_path), Path(vae_path)
    depth = var_cfg.depth
    var_state = _load_file(var_path, what=f"VAR-d{depth} transformer checkpoint")
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in var_state):
        raise CheckpointMismatchError(
            f"{var_path} is a VQVAE tokenizer checkpoint, not the {variant_name} transformer; pass it as "
            f"--weights vae=PATH and the transformer file as --weights var=PATH."
        )
    per_block = var_cfg.width // depth if var_cfg.width % depth == 0 else None
    seen = infer_depth(var_state, per_block)
    if seen is not None and seen != depth:
        raise CheckpointMismatchError(
            f"{var_path} looks like a VAR-d{seen} checkpoint, but teacher '{variant_name}' is VAR-d{depth}; "
            f"use --teacher var-d{seen} or pass the depth-{depth} file."
        )
    var = _build(VAR, var_cfg, var_state, variant=variant_name, file=str(var_path))
    vae_state = _load_file(vae_path, what="VAR VQVAE tokenizer checkpoint")
    vae = _build(VQVAE, vae_cfg, vae_state, variant=f"{variant_name} tokenizer", file=str(vae_path))
    return var, vae


def build_official(depth: int, var_path: Path, vae_path: Path, *, variant_name: str) -> tuple[VAR, VQVAE]:
    """`var_d{depth}.pth` + `vae_ch160v4096z32.pth` with the released configs."""
    var_cfg = var_config(depth)
    return load_checkpoints(var_path, vae_path, var_cfg, vae_config(var_cfg.patch_nums), variant_name=variant_name)


def build_bundled(config_path: Path, var_path: Path, vae_path: Path, *, variant_name: str) -> tuple[VAR, VQVAE]:
    """A miniature saved by dd2 (safetensors + JSON config with `var` and `vae` sections)."""
    config = read_json(config_path)
    try:
        var_cfg, vae_cfg = VARConfig.from_dict(config["var"]), VQVAEConfig.from_dict(config["vae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(
            f"{config_path} is not a valid {variant_name} config ({type(exc).__name__}: {exc}); reinstall dd2 or "
            f"rerun examples/train_var_digits.py."
        ) from None
    return load_checkpoints(var_path, vae_path, var_cfg, vae_cfg, variant_name=variant_name)


def load_variant(variant: Variant, weight_paths: Mapping[str, Path], device: str) -> VarTeacher:
    """`Variant.loader` of every VAR variant (`options` says official depth or bundled config)."""
    opts = variant.options
    if "config" in opts:
        var, vae = build_bundled(Path(opts["config"]), weight_paths["var"], weight_paths["vae"],
                                 variant_name=variant.name)
    else:
        var, vae = build_official(int(opts["depth"]), weight_paths["var"], weight_paths["vae"],
                                  variant_name=variant.name)
    teacher = VarTeacher(var, vae, variant_name=variant.name,
                         stage1=opts.get("stage1", SamplingSettings()),
                         target=opts.get("target", SamplingSettings()),
                         evaluation=opts.get("evaluation", SamplingSettings()),
                         weight_files=weight_paths)
    return teacher.to(device)


def skeleton_teacher(variant: Variant) -> VarTeacher:
    """`Variant.skeleton` of the official variants: the released architecture at its initial weights, no file read
    (the memory plan builds it on the meta device)."""
    opts = variant.options
    var_cfg = var_config(int(opts["depth"]))
    return VarTeacher(VAR(var_cfg), VQVAE(vae_config(var_cfg.patch_nums)), variant_name=variant.name,
                      stage1=opts.get("stage1", SamplingSettings()), target=opts.get("target", SamplingSettings()),
                      evaluation=opts.get("evaluation", SamplingSettings()))


def new_teacher(var_cfg: VARConfig, vae_cfg: VQVAEConfig, *, seed: int = 0, variant_name: str = "var-random",
                lively: bool = True, **settings: SamplingSettings) -> VarTeacher:
    """A randomly initialised teacher (tests, benchmarks, training from scratch).

    `lively=True` uses large AdaLN gates and head weights so every block visibly shapes the logits
    (what contract tests need); `False` is the training initialisation.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the VQVAE convs use torch's default initialisation
    var = VAR(var_cfg)
    if lively:
        var.init_weights(adaln_gamma=0.5, head=1.0, std=0.05, generator=gen)
    else:
        var.init_weights(generator=gen)
    vae = VQVAE(vae_cfg)
    return VarTeacher(var, vae, variant_name=variant_name, **settings)
