"""LlamaGen seen through the dd2 teacher contract (dd2cli.teacher), plus the variant loaders.

- `LlamaGenTeacher`: teacher-forced logits in one pass, CFG/top-k/top-p exactly as upstream's
  `generate.py`, a KV-cached AR sampler that can continue from a prefix, VQ decode/encode.
  It reads token ids through `tok_embeddings`: continuous inputs are snapped
  to the nearest normalised codebook row. `with_continuous_input(adapter)` gives a teacher that
  reads continuous latents through an adapter instead (see `adapt.py`).
- `ContinuousInputAdapter`: the MLP `R^d → dim` (softmax hidden layer: a soft nearest-codebook
  lookup) that replaces `tok_embeddings` in the backbone (docs/method.md §3), fitted once per teacher
  so that `adapter(c_j) ≈ tok_embeddings[j]`.
- `LlamaGenBackbone`: trainable copy of the trunk (class embedding, blocks, final norm) whose
  token input is the adapter of the previous position's latent.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2cli import (
    Backbone,
    BundleParts,
    DD2Error,
    ModuleRecipe,
    SamplingSettings,
    Teacher,
    TeacherSpec,
    cache_dir,
    check_state_dict,
    fingerprint_file,
    load_foreign_checkpoint,
    load_safetensors,
    read_json,
    save_safetensors,
    sha256_file,
)

from .adapt import adapt_teacher
from .gpt import GPTConfig, LlamaGenGPT, Trunk
from .vq import VQConfig, VQModel

#: the tokenizer keys a bundle's decoder needs (the encoder, `quant_conv` and usage history stay behind)
_DECODER_PREFIXES = ("decoder.", "post_quant_conv.", "quantize.embedding.")
#: images per decoder pass, as `LlamaGenTeacher.decode` (bounds the memory of big tokenizers)
DECODE_CHUNK = 32

#: sampling settings of the DD2 paper for LlamaGen (docs/method.md §4, §7) at V = 16384
PAPER_STAGE1 = SamplingSettings(cfg=2.0, top_k=8000, top_p=1.0)
PAPER_TARGET = SamplingSettings(cfg=2.0, top_k=900, top_p=1.0)
PAPER_EVALUATION = SamplingSettings(cfg=2.0, top_k=8000, top_p=1.0)
PAPER_VOCAB = 16384


def scaled_settings(settings: SamplingSettings, vocab_size: int) -> SamplingSettings:
    """The paper's top-k scaled to another codebook size (same kept fraction, at least 1)."""
    if settings.top_k <= 0 or vocab_size == PAPER_VOCAB:
        return settings
    return replace(settings, top_k=max(1, round(settings.top_k * vocab_size / PAPER_VOCAB)))


def kth_largest(logits_BNV: Tensor, k: int) -> Tensor:
    """The k-th largest value of each row, `(..., 1)` (k clipped to V): the top-k threshold.

    `kthvalue` (selection) returns the very value `topk(k).values[..., -1]` does, without ordering
    k values: about 3x faster at top-k 8000 of 16384, once per decoding step.
    """
    V = logits_BNV.shape[-1]
    return torch.kthvalue(logits_BNV, V - min(k, V) + 1, dim=-1, keepdim=True).values


# ---- continuous input adapter --------------------------------------------------------------------

class ContinuousInputAdapter(nn.Module):
    """Two-layer MLP `R^d → dim` with a softmax hidden layer: `fc2(softmax(fc1(z)))`.

    It replaces the id-indexed `tok_embeddings` table. `fc1` has one unit per codebook row
    (initialised to `β·ĉ_j`), so the hidden layer is a soft nearest-codebook lookup over the unit
    sphere and `fc2` holds one output vector per row (fitted so that `adapter(ĉ_j) = emb[j]`).
    Near a codebook vector it returns (almost) that token's embedding, and it is smooth in
    between. Why not a SiLU MLP: on llamagen-digits a random-feature SiLU MLP that fits every row
    (relative error 0.003) reads codebook vectors + N(0, 0.05²) noise with next-token KL 3.7 nats
    against the original teacher; this adapter (error 3e-8) gives 0.0004.
    """

    def __init__(self, latent_dim: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, z_BLd: Tensor) -> Tensor:
        return self.fc2(torch.softmax(self.fc1(z_BLd.to(self.fc1.weight.dtype)), dim=-1))


def _lookup_weights(code_Vd: Tensor, beta: float, rows: slice) -> Tensor:
    """Hidden activations `softmax(β ⟨ĉ_r, ĉ_j⟩)_j` of the adapter at codebook rows `rows`."""
    return torch.softmax(beta * code_Vd[rows] @ code_Vd.T, dim=-1)


def choose_beta(code_Vd: Tensor, self_weight: float = 0.99, beta0: float = 8.0, beta_max: float = 1e5,
                chunk: int = 4096) -> float:
    """Smallest `β = beta0·2^k` whose lookup puts a mean weight >= `self_weight` on the row itself."""
    V = code_Vd.shape[0]
    beta = beta0
    while beta < beta_max:
        diag = torch.cat([_lookup_weights(code_Vd, beta, slice(s, s + chunk)).diagonal(offset=s)
                          for s in range(0, V, chunk)])
        if diag.mean().item() >= self_weight:
            break
        beta *= 2
    return beta


def relative_fit_error(adapter: nn.Module, code_Vd: Tensor, emb_VC: Tensor, chunk: int = 4096) -> float:
    """`‖adapter(C) − E‖_F / ‖E‖_F` over every codebook row (rows chunked: the hidden layer is V wide)."""
    with torch.no_grad():
        sq = sum(((adapter(code_Vd[s : s + chunk]) - emb_VC[s : s + chunk]) ** 2).sum().item()
                 for s in range(0, code_Vd.shape[0], chunk))
        return sq**0.5 / max(emb_VC.norm().item(), 1e-12)


@torch.no_grad()
def fit_input_adapter(code_Vd: Tensor, emb_VC: Tensor, beta: float | None = None, steps: int = 50,
                      tol: float = 1e-6, chunk: int = 4096) -> tuple[ContinuousInputAdapter, float]:
    """Fit `adapter(ĉ_j) ≈ emb[j]` for every codebook row; returns `(adapter (frozen), relative error)`.

    1. `fc1 = β·Ĉ` (no bias), with `β` from `choose_beta` unless given;
    2. `fc2 = E`, then up to `steps` Richardson iterations `W ← W + (E − Φ W)` on the interpolation
       condition `Φ W = E` (`Φ = softmax(β Ĉ Ĉᵀ)`, close to the identity), stopping when the
       relative residual is below `tol`. Rows are chunked so `Φ` never exists whole.
    Deterministic (no randomness).
    """
    code_Vd = F.normalize(code_Vd.detach().float(), dim=-1)
    emb_VC = emb_VC.detach().float()
    V, d = code_Vd.shape
    beta = float(beta) if beta is not None else choose_beta(code_Vd, chunk=chunk)
    adapter = ContinuousInputAdapter(d, emb_VC.shape[1], V).to(code_Vd.device)
    adapter.fc1.weight.copy_(beta * code_Vd)
    adapter.fc1.bias.zero_()
    adapter.fc2.bias.zero_()
    out_VC = emb_VC.clone()  # fc2.weight transposed: one output vector per codebook row
    norm = emb_VC.norm().clamp_min(1e-12)
    for _ in range(steps):
        residual_VC = emb_VC - torch.cat([_lookup_weights(code_Vd, beta, slice(s, s + chunk)) @ out_VC
                                          for s in range(0, V, chunk)])
        if residual_VC.norm() / norm < tol:
            break
        out_VC += residual_VC
    adapter.fc2.weight.copy_(out_VC.T)
    adapter.beta = beta
    adapter.eval().requires_grad_(False)
    return adapter, relative_fit_error(adapter, code_Vd, emb_VC)


#: part of the cache key: a change to `fit_input_adapter`'s algorithm bumps it, so no older fit is read back
_ADAPTER_FIT_VERSION = 1


def _adapter_cache_key(code_Vd: Tensor, emb_VC: Tensor, beta: float | None, steps: int) -> str:
    weights = _tensor_fingerprint({"codebook": code_Vd, "embeddings": emb_VC})
    return hashlib.sha256(f"fit v{_ADAPTER_FIT_VERSION} beta={beta} steps={steps} {weights}".encode()).hexdigest()


def cached_input_adapter(code_Vd: Tensor, emb_VC: Tensor, beta: float | None = None,
                         steps: int = 50) -> ContinuousInputAdapter:
    """`fit_input_adapter`, read back from dd2's cache folder when the same codebook and embeddings were fitted
    before. The fit is deterministic but costs about a minute at V = 16384 on a CPU, and every process that builds
    a backbone needs it (each torchrun rank, `dd2 sample --from`, `dd2 export`); the cached copy is keyed by a hash
    of both tensors, `beta` and `steps`. `fit_error` and `beta` are set on the returned (frozen) adapter."""
    key = _adapter_cache_key(code_Vd, emb_VC, beta, steps)
    path = cache_dir() / "llamagen" / f"input-adapter-{key[:32]}.safetensors"
    if path.is_file():
        try:
            state, meta = load_safetensors(path)
            with torch.device("meta"):
                adapter = ContinuousInputAdapter(code_Vd.shape[1], emb_VC.shape[1], code_Vd.shape[0])
            adapter.load_state_dict(state, strict=True, assign=True)
            adapter.beta, adapter.fit_error = float(meta["beta"]), float(meta["fit_error"])
            return adapter.to(code_Vd.device).eval().requires_grad_(False)
        except (DD2Error, KeyError, ValueError, RuntimeError):
            pass  # a damaged or foreign entry: fitted again below, and replaced
    adapter, err = fit_input_adapter(code_Vd, emb_VC, beta=beta, steps=steps)
    adapter.fit_error = err
    try:
        save_safetensors(path, adapter.state_dict(), {"beta": adapter.beta, "fit_error": err, "key": key})
    except DD2Error:
        pass  # the cache only saves time: an unwritable cache folder costs the next process a refit, not a run
    return adapter


# ---- backbone ------------------------------------------------------------------------------------

def _copy_trunk(gpt: LlamaGenGPT) -> Trunk:
    """A fresh `Trunk` holding copies of the GPT's trunk weights (built on meta: no wasted init)."""
    with torch.device("meta"):
        trunk = Trunk(gpt.cfg)
    own = set(trunk.state_dict())
    state = {k: v.detach().clone() for k, v in gpt.state_dict().items() if k in own}
    trunk.load_state_dict(state, strict=True, assign=True)
    trunk.reset_rope(gpt.norm.weight.device)
    return trunk


class LlamaGenBackbone(Backbone):
    """Trunk copy + continuous input adapter: `f_BNC = norm(blocks([cls, adapter(z_0..z_{n-2})]))`.

    Position `i` reads the adapter of `z_{i-1}` (position 0 sees only the class token), exactly as
    the teacher reads `tok_embeddings(tok_{i-1})`, so `f_i` depends on the label and `z_<i` only.
    """

    def __init__(self, gpt: LlamaGenGPT, adapter: nn.Module) -> None:
        super().__init__()
        self.trunk = _copy_trunk(gpt)
        self.adapter = copy.deepcopy(adapter)
        self.feature_dim = gpt.cfg.dim
        self.requires_grad_(True)
        self.train()

    def forward(self, z_BNd: Tensor, labels_B: Tensor) -> Tensor:
        dtype = self.trunk.norm.weight.dtype
        h_BNC = torch.cat([self.trunk.cls_embedding(labels_B.long()),
                           self.adapter(z_BNd[:, :-1]).to(dtype)], dim=1)
        return self.trunk.run(h_BNC, 0)


# ---- teacher -------------------------------------------------------------------------------------

class LlamaGenTeacher(Teacher):
    """A frozen LlamaGen (GPT + VQ) under the dd2 teacher contract.

    `input_adapter=None`: the official teacher, reading token ids (continuous latents are snapped
    to the nearest normalised codebook row). With an adapter: reads latents `z` through it instead
    of `tok_embeddings` (ids are first mapped to their codebook vectors).
    """

    def __init__(self, gpt: LlamaGenGPT, vq: VQModel, *, variant_name: str = "llamagen",
                 image_size: int | None = None, stage1: SamplingSettings | None = None,
                 target: SamplingSettings | None = None, evaluation: SamplingSettings | None = None,
                 weight_ids: Mapping[str, str] | None = None, input_adapter: nn.Module | None = None,
                 adapter_beta: float | None = None, adapter_fit_steps: int = 50) -> None:
        super().__init__()
        cfg = gpt.cfg
        if vq.cfg.codebook_size != cfg.vocab_size:
            raise DD2Error(f"The GPT has {cfg.vocab_size} token ids but the VQ codebook has "
                           f"{vq.cfg.codebook_size} rows; load a matching tokenizer.")
        self.gpt = gpt
        self.vq = vq
        self.input_adapter = input_adapter
        self.variant_name = variant_name
        self.weight_ids = dict(weight_ids or {})
        self.adapter_beta = adapter_beta
        self.adapter_fit_steps = adapter_fit_steps
        self.grid = cfg.grid_size
        V = cfg.vocab_size
        self.spec = TeacherSpec(
            num_tokens=cfg.block_size,
            vocab_size=V,
            latent_dim=vq.cfg.codebook_embed_dim,
            num_classes=cfg.num_classes,
            null_class=cfg.num_classes,
            steps=tuple(range(cfg.block_size)),  # one token per AR step
            image_size=image_size or cfg.grid_size * vq.cfg.downsample,
            stage1=stage1 or scaled_settings(PAPER_STAGE1, V),
            target=target or scaled_settings(PAPER_TARGET, V),
            evaluation=evaluation or scaled_settings(PAPER_EVALUATION, V),
        )
        self.requires_grad_(False)
        self.eval()
        # the fitted adapter is cached outside the module tree (not part of the teacher's state)
        self.__dict__["_fitted"] = None

    # ---- latent space ---------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        return self.vq.codebook().float()

    # ---- inputs ---------------------------------------------------------------------------------
    def _embed(self, x_BL: Tensor) -> Tensor:
        """Transformer input for ids `(B, L)` or latents `(B, L, d)` (the tokens, not the class)."""
        dtype = self.gpt.norm.weight.dtype
        if self.input_adapter is None:
            return self.gpt.tok_embeddings(self.as_tokens(x_BL))
        return self.input_adapter(self.as_latents(x_BL).float()).to(dtype)

    def _input_sequence(self, x_BN: Tensor, labels_B: Tensor) -> Tensor:
        """`[class token, token_0 .. token_{L-1}]` embeddings `(B, L+1, dim)`."""
        return torch.cat([self.gpt.cls_embedding(labels_B.long()), self._embed(x_BN)], dim=1)

    def logits(self, x_BN: Tensor, labels_B: Tensor) -> Tensor:
        """Teacher-forced logits `(B, n, V)`: `logits[:, i]` = p(token_i | class, tokens_<i)."""
        h_BNC = self._input_sequence(x_BN[:, :-1], labels_B)
        return self.gpt.head(self.gpt.run(h_BNC, 0))

    # ---- guidance and filtering (upstream generate.py) -----------------------------------------
    def guide(self, logits_c_BNV: Tensor, logits_u_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        """`uncond + cfg·(cond − uncond)`; with `cfg_interval >= 0`, positions `i > cfg_interval+1`
        use the conditional logits only (upstream switches CFG off after decode index cfg_interval)."""
        guided = logits_u_BNV + (logits_c_BNV - logits_u_BNV) * settings.cfg
        if settings.cfg_interval >= 0:
            N = logits_c_BNV.shape[1]
            late_N = torch.arange(N, device=guided.device) > settings.cfg_interval + 1
            guided = torch.where(late_N[None, :, None], logits_c_BNV, guided)
        return guided

    def _guide_step(self, logits_c_BV: Tensor, logits_u_BV: Tensor, settings: SamplingSettings,
                    position: int) -> Tensor:
        if settings.cfg_interval >= 0 and position > settings.cfg_interval + 1:
            return logits_c_BV
        return logits_u_BV + (logits_c_BV - logits_u_BV) * settings.cfg

    def filter_logits(self, logits_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        """`/max(temperature, 1e-5)`, then HF-style top-k (ties with the k-th kept), then top-p."""
        # dividing by 1 is exact: skip a pass over (B, V) per decoding step
        logits = logits_BNV / max(settings.temperature, 1e-5) if settings.temperature != 1.0 else logits_BNV
        if settings.top_k > 0:
            logits = logits.masked_fill(logits < kth_largest(logits, settings.top_k), float("-inf"))
        if settings.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative > settings.top_p
            # shift right: keep the token that crosses the threshold, and always the first
            remove[..., 1:] = remove[..., :-1].clone()
            remove[..., 0] = False
            logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        return logits

    def uses_guidance(self, settings: SamplingSettings) -> bool:
        return settings.cfg != 1.0

    # ---- AR sampler -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels_B, settings, prefix_BN=None, start_step=0, generator=None, return_logits=False):
        """KV-cached AR sampling, one token per step (upstream `generate`).

        CFG doubles the batch, conditional rows first. With `prefix_BN` and `start_step = s`, the
        class token and tokens `0..s-1` are prefilled in one pass and sampling continues at `s`.
        """
        n, V = self.spec.num_tokens, self.spec.vocab_size
        labels_B = labels_B.long().to(self.device)
        B = labels_B.shape[0]
        s = int(start_step)
        if not 0 <= s <= n:
            raise DD2Error(f"start_step {s} is outside 0..{n}; pass a step of this teacher.")
        if s > 0 and prefix_BN is None:
            raise DD2Error(f"start_step {s} needs prefix_BN holding the first {s} tokens.")
        guided = self.uses_guidance(settings)
        rows = 2 if guided else 1
        labels_R = torch.cat([labels_B, torch.full_like(labels_B, self.spec.null_class)]) if guided else labels_B

        tokens_BN = torch.zeros(B, n, dtype=torch.long, device=self.device)
        logits_out = torch.full((B, n, V), float("nan"), device=self.device) if return_logits else None
        prefix = None
        if s > 0:
            prefix = prefix_BN[:, :s].to(self.device)
            tokens_BN[:, :s] = self.as_tokens(prefix)
        if s == n:
            if return_logits:
                logits_out.copy_(self.logits(tokens_BN, labels_B))
            return (tokens_BN, logits_out) if return_logits else tokens_BN

        # 1. prefill: class token (+ prefix tokens) at positions 0..s in one causal pass
        cache = self.gpt.new_cache(rows * B, n)  # position n-1 holds the last input token
        h_RLC = self.gpt.cls_embedding(labels_R)
        if prefix is not None:
            h_RLC = torch.cat([h_RLC, self._embed(prefix).repeat(rows, 1, 1)], dim=1)
        f_RLC = self.gpt.run(h_RLC, 0, cache)
        if return_logits and s > 0:
            logits_out[:, :s] = self.gpt.head(f_RLC[:B, :s])
        logits_RV = self.gpt.head(f_RLC[:, -1])

        for i in range(s, n):
            # 2. logits of token i were computed by the previous pass; guide, filter, sample
            if i > s:
                f_R1C = self.gpt.run(self._embed(tokens_BN[:, i - 1 : i]).repeat(rows, 1, 1), i, cache)
                logits_RV = self.gpt.head(f_R1C[:, 0])
            if return_logits:
                logits_out[:, i] = logits_RV[:B]
            if guided:
                step_BV = self._guide_step(logits_RV[:B], logits_RV[B:], settings, i)
            else:
                step_BV = logits_RV
            probs_BV = self.filter_logits(step_BV, settings).softmax(-1)
            tokens_BN[:, i] = torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
        return (tokens_BN, logits_out) if return_logits else tokens_BN

    # ---- images -----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x_BN: Tensor, chunk: int = DECODE_CHUNK) -> Tensor:
        """Token ids (or latents, snapped to the nearest codebook rows) → images in [0, 1]."""
        ids_BN = self.as_tokens(x_BN)
        out = [self.vq.decode_code(ids_BN[s : s + chunk], (self.grid, self.grid)) for s in range(0, len(ids_BN), chunk)]
        return ((torch.cat(out).float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images_B3HW: Tensor) -> Tensor:
        size = self.spec.image_size
        if images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3 or tuple(images_B3HW.shape[-2:]) != (size, size):
            raise DD2Error(f"{self.variant_name} encodes images of shape (B, 3, {size}, {size}), got "
                           f"{tuple(images_B3HW.shape)}; resize the images first.")
        x = images_B3HW.to(self.device, self.vq.post_quant_conv.weight.dtype) * 2 - 1
        return self.vq.encode(x)[2]

    # ---- continuous input --------------------------------------------------------------------------
    def fitted_adapter(self) -> ContinuousInputAdapter:
        """The continuous input adapter fitted to `tok_embeddings` (fitted once, then cached)."""
        if self.input_adapter is not None:
            return self.input_adapter
        if self._fitted is None:
            self.__dict__["_fitted"] = cached_input_adapter(self.codebook(), self.gpt.tok_embeddings.weight,
                                                            beta=self.adapter_beta, steps=self.adapter_fit_steps)
        if self._fitted.fc1.weight.device != self.device:  # the teacher was moved after fitting
            self._fitted.to(self.device)
        return self._fitted

    @property
    def adapter_fit_error(self) -> float:
        """Relative error `‖adapter(C) − E‖/‖E‖` of the fitted adapter (fits it if needed)."""
        return float(getattr(self.fitted_adapter(), "fit_error", float("nan")))

    def with_continuous_input(self, adapter: nn.Module, gpt: LlamaGenGPT | None = None) -> "LlamaGenTeacher":
        """A teacher that reads continuous latents through `adapter` (and optionally another GPT).

        Shares the VQ (and the GPT unless one is given).
        """
        adapter = adapter.eval().requires_grad_(False)
        gpt = self.gpt if gpt is None else gpt.eval().requires_grad_(False)
        t = LlamaGenTeacher(gpt, self.vq, variant_name=self.variant_name, image_size=self.spec.image_size,
                            stage1=self.spec.stage1, target=self.spec.target, evaluation=self.spec.evaluation,
                            weight_ids=self.weight_ids, input_adapter=adapter,
                            adapter_beta=self.adapter_beta, adapter_fit_steps=self.adapter_fit_steps)
        if gpt is not self.gpt:
            t.weight_ids["adapted_gpt"] = _tensor_fingerprint(gpt.state_dict())
        t.weight_ids["input_adapter"] = _tensor_fingerprint(adapter.state_dict())
        return t

    def new_backbone(self) -> LlamaGenBackbone:
        return LlamaGenBackbone(self.gpt, self.fitted_adapter())

    def identity(self) -> dict:
        return {"teacher": self.variant_name, "family": "llamagen", "weights": dict(self.weight_ids),
                "continuous_input": self.input_adapter is not None}

    # ---- export -----------------------------------------------------------------------------------
    def adapt_continuous_input(self, *, steps: int, batch_size: int, lr: float, train_model: bool,
                               noise_std: float, generator: torch.Generator | None = None):
        """`dd2 distill`'s optional adaptation step (see `dd2_llamagen.adapt.adapt_teacher`)."""
        report = adapt_teacher(self, steps=steps, batch_size=batch_size, lr=lr, generator=generator,
                               train_model=train_model, noise_std=noise_std)
        return report.teacher, report.as_dict()

    def bundle_parts(self, backbone: LlamaGenBackbone) -> BundleParts:
        """Configs, decoder weights and codebook for `dd2 export`; `dd2_llamagen.export` holds the factories."""
        if not isinstance(backbone, LlamaGenBackbone):
            raise DD2Error(f"Teacher '{self.variant_name}' exports generators whose backbone is a LlamaGenBackbone, "
                           f"not a {type(backbone).__name__}; export a run made with this teacher.")
        adapter = backbone.adapter
        if not isinstance(adapter, ContinuousInputAdapter):
            raise DD2Error(f"The backbone reads latents through a {type(adapter).__name__}, which dd2 bundles cannot "
                           f"rebuild; only the ContinuousInputAdapter of dd2_llamagen is supported.")
        arch = {"gpt": backbone.trunk.cfg.as_dict(),
                "adapter": {"latent_dim": adapter.fc1.in_features, "hidden": adapter.fc1.out_features,
                            "dim": adapter.fc2.out_features}}
        vq_state = self.vq.state_dict()
        decoder_state = {f"vq.{k}": v for k, v in vq_state.items() if k.startswith(_DECODER_PREFIXES)}
        return BundleParts(
            backbone=ModuleRecipe("dd2_llamagen.export:build_backbone", arch),
            decoder=ModuleRecipe("dd2_llamagen.export:build_decoder",
                                 {"vq": self.vq.cfg.as_dict(), "grid": self.grid, "chunk": DECODE_CHUNK},
                                 decoder_state),
            codebook_Vd=self.codebook(),
        )


def _tensor_fingerprint(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- loading -----------------------------------------------------------------------------------

def _materialise(module: nn.Module, state: Mapping[str, Tensor], *, variant: str, file: str) -> None:
    """Strict key/shape check, then assign the tensors into a meta-device module (no double memory)."""
    check_state_dict(module, state, variant=variant, file=file)
    state = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)


def build_teacher_from_state(gpt_cfg: GPTConfig, vq_cfg: VQConfig, gpt_state: Mapping[str, Tensor],
                             vq_state: Mapping[str, Tensor], *, variant: str, device: str = "cpu",
                             gpt_file: str = "", vq_file: str = "", **teacher_kwargs) -> LlamaGenTeacher:
    """Build both networks on the meta device and load the state dicts strictly."""
    with torch.device("meta"):
        gpt = LlamaGenGPT(gpt_cfg)
        vq = VQModel(vq_cfg)
    _materialise(gpt, gpt_state, variant=variant, file=gpt_file)
    _materialise(vq, vq_state, variant=f"{variant} tokenizer", file=vq_file)
    gpt.reset_rope("cpu")
    teacher = LlamaGenTeacher(gpt, vq, variant_name=variant, **teacher_kwargs)
    return teacher.to(device)


def load_from_checkpoints(gpt_path: str | Path, vq_path: str | Path, gpt_cfg: GPTConfig,
                          vq_cfg: VQConfig | None = None, *, variant: str, device: str = "cpu",
                          fingerprint: bool = True, **teacher_kwargs) -> LlamaGenTeacher:
    """Official `.pt` files (weights under "model", or a bare FSDP state dict), loaded strictly."""
    gpt_state = load_foreign_checkpoint(gpt_path, what=f"{variant} GPT checkpoint")
    vq_state = load_foreign_checkpoint(vq_path, what=f"{variant} VQ tokenizer checkpoint")
    ids = {"gpt": fingerprint_file(gpt_path), "vq": fingerprint_file(vq_path)} if fingerprint else {}
    return build_teacher_from_state(gpt_cfg, vq_cfg or VQConfig(), gpt_state, vq_state, variant=variant,
                                    device=device, gpt_file=str(gpt_path), vq_file=str(vq_path),
                                    weight_ids=ids, **teacher_kwargs)


def load_official_variant(variant, weight_paths: Mapping[str, Path], device: str) -> LlamaGenTeacher:
    """`Variant.loader` for llamagen-{b,l,xl,xxl,3b}[-384]."""
    opts = variant.options
    cfg = GPTConfig.named(opts["gpt_size"], opts["image_size"])
    return load_from_checkpoints(weight_paths["gpt"], weight_paths["vq"], cfg, VQConfig(), variant=variant.name,
                                 device=device, image_size=opts["image_size"],
                                 adapter_beta=opts.get("adapter_beta"))


def skeleton_teacher(variant) -> LlamaGenTeacher:
    """`Variant.skeleton` of llamagen-{b,l,...}: the released architecture at its initial weights, no file read (the
    memory plan builds it on the meta device)."""
    opts = variant.options
    cfg = GPTConfig.named(opts["gpt_size"], opts["image_size"])
    gpt, vq = LlamaGenGPT(cfg), VQModel(VQConfig())
    teacher = LlamaGenTeacher(gpt, vq, variant_name=variant.name, image_size=opts["image_size"])
    # the continuous-input adapter is fitted to the weights; with none to fit, one of the same shape stands in
    teacher.__dict__["_fitted"] = ContinuousInputAdapter(vq.cfg.codebook_embed_dim, cfg.dim, cfg.vocab_size)
    return teacher


def _config_from_json(meta: Mapping) -> tuple[GPTConfig, VQConfig, dict]:
    gpt_cfg = GPTConfig(**meta["gpt"])
    vq_cfg = VQConfig(**{**meta["vq"], "ch_mult": tuple(meta["vq"]["ch_mult"])})
    settings = {k: SamplingSettings(**meta["sampling"][k]) for k in ("stage1", "target", "evaluation")
                if k in meta.get("sampling", {})}
    return gpt_cfg, vq_cfg, settings


def load_bundled_variant(variant, weight_paths: Mapping[str, Path], device: str) -> LlamaGenTeacher:
    """`Variant.loader` for dd2-trained safetensors weights (+ the JSON config named in options)."""
    # a retrained copy passed with --weights carries its own config next to it
    config = Path(weight_paths["gpt"]).with_name(Path(variant.options["config"]).name)
    meta = read_json(config if config.is_file() else Path(variant.options["config"]))
    gpt_cfg, vq_cfg, settings = _config_from_json(meta)
    gpt_state, _ = load_safetensors(weight_paths["gpt"])
    vq_state, _ = load_safetensors(weight_paths["vq"])
    ids = {k: sha256_file(p) for k, p in weight_paths.items()}
    return build_teacher_from_state(gpt_cfg, vq_cfg, gpt_state, vq_state, variant=variant.name, device=device,
                                    gpt_file=str(weight_paths["gpt"]), vq_file=str(weight_paths["vq"]),
                                    weight_ids=ids, image_size=meta.get("image_size"),
                                    adapter_beta=meta.get("adapter_beta"), **settings)
