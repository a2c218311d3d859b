"""The teacher contract: what the engine may ask of any AR image model (docs/architecture.md).

A family plugin subclasses `Teacher` (and returns a `Backbone` from `new_backbone`). Inputs named
`x_BN` accept either token ids (`LongTensor (B, n)`) or continuous latents (`FloatTensor (B, n, d)`)
in the method's latent space (`codebook()` rows); the helpers `as_tokens` / `as_latents` convert.
Everything is fp32 unless the caller asks otherwise. `dd2cli.testing` checks the contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, overload

import torch
from torch import Tensor, nn

from .teachers import SamplingSettings, TeacherSpec


class Backbone(nn.Module, ABC):
    """The teacher's transformer without its classification head (docs/method.md §3).

    `forward(z_BNd, labels_B) -> f_BNC`: causal features where `f_i` depends only on the label and
    on `z` at positions of AR steps `< step(i)`. `z` are continuous per-position latents (codebook
    vectors, generated tokens or pure noise), turned into the transformer input exactly as the
    teacher turns codebook vectors into its teacher-forcing input.
    """

    #: width C of the returned features
    feature_dim: int

    @abstractmethod
    def forward(self, z_BNd: Tensor, labels_B: Tensor) -> Tensor:  # pragma: no cover - abstract
        ...


class Teacher(nn.Module, ABC):
    """A frozen class-conditional AR image model seen through the DD2 contract.

    Subclasses implement the abstract methods; the base class gives id/latent conversions and a
    generic `sampling_probs` built from `logits` plus the family's `guide` and `filter_logits`.
    """

    spec: TeacherSpec

    # ---- latent space -------------------------------------------------------------------------
    @abstractmethod
    def codebook(self) -> Tensor:
        """`(V, d)` fp32 latent vectors of the token ids, in the method's latent space."""

    def as_latents(self, x_BN: Tensor) -> Tensor:
        """Token ids `(B, n)` → latents `(B, n, d)`; latents pass through unchanged."""
        if x_BN.dtype in (torch.int64, torch.int32):
            return self.codebook()[x_BN.long()]
        return x_BN

    def as_tokens(self, x_BN: Tensor) -> Tensor:
        """Latents `(B, n, d)` → nearest-codebook ids `(B, n)` (L2); ids pass through unchanged."""
        if x_BN.dtype in (torch.int64, torch.int32):
            return x_BN.long()
        return nearest_codebook(x_BN, self.codebook())

    # ---- teacher-forced logits ------------------------------------------------------------------
    @abstractmethod
    def logits(self, x_BN: Tensor, labels_B: Tensor) -> Tensor:
        """Teacher-forced logits `(B, n, V)` fp32 at every position, in one parallel pass.

        Position `i` is conditioned on the label and on the tokens of AR steps `< step(i)` only.
        `labels_B == spec.null_class` gives the unconditional logits. No label dropping.
        """

    @abstractmethod
    def guide(self, logits_c_BNV: Tensor, logits_u_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        """Classifier-free guidance as the family's sampler applies it, per position."""

    @abstractmethod
    def filter_logits(self, logits_BNV: Tensor, settings: SamplingSettings) -> Tensor:
        """Temperature, top-k, top-p as the family's sampler applies them; removed entries → −inf."""

    def uses_guidance(self, settings: SamplingSettings) -> bool:
        """Whether `settings` needs the unconditional pass (families override their convention)."""
        return settings.cfg != 1.0

    def sampling_logits(self, x_BN: Tensor, labels_B: Tensor, settings: SamplingSettings) -> Tensor:
        """Log-probabilities (up to a constant per row) of `p_i`, −inf outside the kept support."""
        if self.uses_guidance(settings):
            labels_2B = torch.cat([labels_B, torch.full_like(labels_B, self.spec.null_class)])
            logits_2BNV = self.logits(torch.cat([x_BN, x_BN]), labels_2B)
            logits_c, logits_u = logits_2BNV.chunk(2)
            logits_BNV = self.guide(logits_c, logits_u, settings)
        else:
            logits_BNV = self.logits(x_BN, labels_B)
        return self.filter_logits(logits_BNV, settings)

    def sampling_probs(self, x_BN: Tensor, labels_B: Tensor, settings: SamplingSettings) -> Tensor:
        """`p_i ∈ Δ^V` for every position `(B, n, V)`; entries outside the kept support are 0."""
        return torch.softmax(self.sampling_logits(x_BN, labels_B, settings), dim=-1)

    # ---- AR sampler -----------------------------------------------------------------------------
    @overload
    def sample(self, labels_B: Tensor, settings: SamplingSettings, prefix_BN: Tensor | None = ...,
               start_step: int = ..., generator: torch.Generator | None = ...,
               return_logits: bool = ...) -> Tensor: ...

    @abstractmethod
    def sample(self, labels_B, settings, prefix_BN=None, start_step=0, generator=None,
               return_logits=False):
        """The family's own AR sampler (KV cache). Returns token ids `(B, n)`.

        With `prefix_BN` (ids or latents, `(B, n)`/`(B, n, d)`) and `start_step = s`, the tokens
        of steps `< s` are taken from the prefix and sampling continues at step `s`.
        With `return_logits=True` returns `(tokens_BN, logits_BNV)` where `logits_BNV` are the raw
        (unguided, unfiltered) logits of the `labels_B` rows computed by the sampler at every
        position it sampled (positions of steps `< start_step`, if any, may be NaN).
        """

    # ---- images ---------------------------------------------------------------------------------
    @abstractmethod
    def decode(self, x_BN: Tensor) -> Tensor:
        """Token ids or latents → images `(B, 3, H, W)` fp32 in `[0, 1]`."""

    def encode(self, images_B3HW: Tensor) -> Tensor:
        """Images in `[0, 1]` → token ids `(B, n)` (optional)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode().")

    # ---- trainable copy -------------------------------------------------------------------------
    @abstractmethod
    def new_backbone(self) -> Backbone:
        """A trainable copy of the transformer without its head (docs/method.md §3)."""

    # ---- conveniences -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.codebook().device

    def steps_tensor(self) -> Tensor:
        """`LongTensor (n,)`: the AR step of every position."""
        return torch.tensor(self.spec.steps, dtype=torch.long, device=self.device)

    def identity(self) -> dict:
        """Facts recorded with every output made from this teacher (name, hashes...)."""
        return {"teacher": getattr(self, "variant_name", type(self).__name__)}

    def exact_joint(self, label: int, settings: SamplingSettings | None = None) -> Tensor | None:
        """`(V,)*n` float64 probabilities of every token-id sequence of class `label` (optional).

        Only teachers small enough to enumerate their joint implement it (the `exact` family); `dd2 eval
        joint-tv` scores sample sets against it. `None` = not available.
        """
        return None

    # ---- export ---------------------------------------------------------------------------------
    def adapt_continuous_input(self, *, steps: int, batch_size: int, lr: float, train_model: bool,
                               noise_std: float, generator: torch.Generator | None = None) -> tuple["Teacher", dict]:
        """Data-free continuous input adaptation (optional; for teachers that read token ids).

        Returns `(adapted teacher, report)`: a teacher that reads continuous latents (so the CSD
        teacher probabilities see generated vectors, not their nearest ids), fine-tuned to match this
        one by KL on its own samples, and a JSON-able report (KL / agreement before and after).
        """
        raise NotImplementedError(
            f"teacher '{getattr(self, 'variant_name', type(self).__name__)}' ({type(self).__name__}) offers no "
            f"continuous input adaptation; leave adapt.steps at 0."
        )

    def bundle_parts(self, backbone: Backbone):
        """What `dd2 export` needs to rebuild `backbone` and the decoder without this teacher.

        Returns a `BundleParts`: factory + JSON config of the backbone architecture,
        factory + config + weights of a decoder (token ids `(B, n)` → images in `[0, 1]`, as
        `decode`), and `codebook()`. Optional: a family without it can still sample from its runs.
        """
        raise NotImplementedError(
            f"the plugin of teacher '{getattr(self, 'variant_name', type(self).__name__)}' "
            f"({type(self).__name__}) does not implement bundle_parts(), so its generators cannot be "
            f"exported as bundles; sample from the run directory instead (dd2 sample --from RUN_DIR)."
        )


# ---- what a plugin returns from `bundle_parts` (dd2 export) ----------------------------------------------

def bundle_factory(fn: Callable[[dict], nn.Module]) -> Callable[[dict], nn.Module]:
    """Mark `fn(config: dict) -> nn.Module` as a factory a bundle's config.json may name.

    A bundle names its factories as text; only functions carrying this mark are ever called, so a
    tampered config.json cannot make `load_generator` call an arbitrary function. Factories run with
    the random initialisers of `torch.nn.init` switched off (the bundle assigns every weight), so
    building on the CPU costs no more than an allocation; tensors the state dict does not hold
    (non-persistent buffers) must be computed, not drawn. Building on the meta device also works.
    """
    fn.__dd2_bundle_factory__ = True
    return fn
@dataclass
class ModuleRecipe:
    """How to rebuild one network without the teacher: `factory(config)`, then its weights.

    `factory` is `"package.module:function"` (a `@bundle_factory`), `config` plain JSON.
    `state` holds the weights (the decoder's); the backbone's weights come from the generator.
    """

    factory: str
    config: dict
    state: Optional[Mapping[str, Tensor]] = None

    def as_json(self) -> dict:
        return {"factory": self.factory, "config": self.config}
@dataclass
class BundleParts:
    """What `Teacher.bundle_parts(backbone)` returns.

    - `backbone`: factory + config that build a module with the same state-dict keys and shapes as
      the generator's backbone (weights not needed);
    - `decoder`: factory + config + state of a module mapping token ids `(B, n)` int64 to images
      `(B, 3, H, W)` fp32 in `[0, 1]`, exactly as `teacher.decode(ids)`;
    - `codebook_Vd`: `teacher.codebook()`, the rows the generator's latents are snapped to.
    """

    backbone: ModuleRecipe
    decoder: ModuleRecipe
    codebook_Vd: Tensor


def nearest_codebook(z_BNd: Tensor, codebook_Vd: Tensor, chunk: int = 8192) -> Tensor:
    """Index of the nearest codebook row (L2) for every vector; chunked to bound memory."""
    flat_Md = z_BNd.reshape(-1, z_BNd.shape[-1]).to(codebook_Vd.dtype)
    c_sq_V = (codebook_Vd * codebook_Vd).sum(-1)
    out = torch.empty(flat_Md.shape[0], dtype=torch.long, device=z_BNd.device)
    for s in range(0, flat_Md.shape[0], chunk):
        part = flat_Md[s : s + chunk]
        # ‖x−c‖² = ‖x‖² − 2⟨x,c⟩ + ‖c‖²; ‖x‖² does not change the argmin
        dist = c_sq_V[None] - 2 * part @ codebook_Vd.T
        out[s : s + chunk] = dist.argmin(-1)
    return out.reshape(z_BNd.shape[:-1])
