"""Train the bundled `var-digits` teacher: a miniature VAR on scikit-learn digits (16×16, 10 classes).

    python examples/train_var_digits.py          # one thread; 11 min on a busy shared 2-core box

Two stages, each readable top to bottom:

1. the multi-scale VQVAE tokenizer (16 px → a 4×4 latent, scales 1,2,3,4 = 30 tokens, V = 128,
   Cvae = 8): reconstruction + codebook/commitment losses through the straight-through f̂, with
   unused codes restarted from encoder outputs;
2. the VAR transformer (3 blocks, width 128): teacher-forced cross-entropy over all 30 tokens,
   labels replaced by the null class 10 % of the time so that classifier-free guidance works.

Writes `plugins/dd2_var/weights/var_digits_{transformer,vae}.safetensors` (stored as fp16, run in
fp32) + `var_digits.json` (configs, training facts and the numbers measured on the saved files)
and `docs/var-digits-samples.png` (one row per class). `--evaluate-only` re-measures shipped weights.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from dd2_var import DIGITS_EVALUATION, DIGITS_STAGE1, WEIGHTS_DIR
from dd2_var.config import VARConfig, VQVAEConfig
from dd2_var.model import VAR
from dd2_var.teacher import VarTeacher, build_bundled
from dd2_var.vqvae import VQVAE
from dd2cli.digits import load_digits_classifier, load_digits_dataset
from dd2cli.files import read_json, save_safetensors, write_json

ROOT = Path(__file__).resolve().parent.parent
PATCH_NUMS = (1, 2, 3, 4)

VAE_CFG = VQVAEConfig(vocab_size=128, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                      patch_nums=PATCH_NUMS)
VAR_CFG = VARConfig(depth=3, width=128, num_heads=2, num_classes=10, vocab_size=128, z_channels=8,
                    patch_nums=PATCH_NUMS)


def augment(x_B3HW: torch.Tensor, gen: torch.Generator, amount: float = 0.08) -> torch.Tensor:
    """Small random shifts and zooms: 1,437 training digits are few for a generative model."""
    B = x_B3HW.shape[0]
    theta = torch.zeros(B, 2, 3)
    scale = 1 + (torch.rand(B, generator=gen) - 0.5) * amount
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = (torch.rand(B, 2, generator=gen) - 0.5) * amount
    grid = F.affine_grid(theta, list(x_B3HW.shape), align_corners=False)
    return F.grid_sample(x_B3HW, grid, align_corners=False, padding_mode="zeros")


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


# ---- stage 1: tokenizer ---------------------------------------------------------------------------

def train_tokenizer(images_B3HW: torch.Tensor, steps: int, gen: torch.Generator, log=print) -> VQVAE:
    vae = VQVAE(VAE_CFG)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3, betas=(0.9, 0.99))
    V = VAE_CFG.vocab_size
    hits_V = torch.zeros(V)
    batch = 64
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3, 100)
        idx = torch.randint(len(images_B3HW), (batch,), generator=gen)
        x = augment(images_B3HW[idx], gen) * 2 - 1
        # 1. encode, multi-scale quantise (straight-through), decode
        f_BChw = vae.img_to_f(x)
        f_hat_st, vq_loss, ids = vae.quantize(f_BChw)
        recon = vae.decoder(vae.post_quant_conv(f_hat_st))
        # 2. reconstruction + codebook/commitment
        rec_loss = F.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean()
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits_V += torch.bincount(torch.cat(ids, 1).flatten(), minlength=V).float()
        # 3. restart codes nobody used in the last window from random latent vectors of all scales
        if (step + 1) % 100 == 0:
            dead = (hits_V == 0).nonzero().flatten()
            if len(dead) and step < steps * 0.8:
                with torch.no_grad():
                    pool_NC = torch.cat([F.interpolate(f_BChw, size=(pn, pn), mode="area").permute(0, 2, 3, 1)
                                         .reshape(-1, VAE_CFG.z_channels) for pn in PATCH_NUMS])
                    pick = torch.randint(len(pool_NC), (len(dead),), generator=gen)
                    # residuals shrink scale by scale: half a latent vector is a plausible residual
                    vae.quantize.embedding.weight[dead] = pool_NC[pick] * 0.5
            if (step + 1) % 200 == 0:
                log(f"  tokenizer step {step + 1}/{steps}: recon {rec_loss.item():.4f} vq {vq_loss.item():.4f} "
                    f"codes used {(hits_V > 0).sum().item()}/{V} ({time.time() - t0:.0f}s)")
            hits_V.zero_()
    return vae.eval()


# ---- stage 2: transformer -------------------------------------------------------------------------

@torch.no_grad()
def tokenize(vae: VQVAE, images_B3HW: torch.Tensor, labels_B: torch.Tensor, copies: int,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set as token sequences: the originals plus `copies` augmented versions."""
    ids, labels = [vae.img_to_ids(images_B3HW * 2 - 1)], [labels_B]
    for _ in range(copies):
        ids.append(vae.img_to_ids(augment(images_B3HW, gen) * 2 - 1))
        labels.append(labels_B)
    return torch.cat(ids), torch.cat(labels)


def train_transformer(vae: VQVAE, ids_BL: torch.Tensor, labels_B: torch.Tensor, steps: int,
                      gen: torch.Generator, log=print) -> VAR:
    var = VAR(VAR_CFG).init_weights(generator=gen)
    decay = [p for n, p in var.named_parameters() if p.ndim >= 2 and "pos_" not in n and "emb" not in n]
    no_decay = [p for n, p in var.named_parameters() if not (p.ndim >= 2 and "pos_" not in n and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    quant = vae.quantize
    null = VAR_CFG.num_classes
    batch = 96
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, 200)
        idx = torch.randint(len(ids_BL), (batch,), generator=gen)
        tokens = ids_BL[idx]
        # 1. class dropout → the model also learns the unconditional distribution (guidance)
        drop = torch.rand(batch, generator=gen) < 0.1
        labels = torch.where(drop, torch.full_like(labels_B[idx], null), labels_B[idx])
        # 2. teacher-forced pass: scale k reads area_down(f̂ of scales < k)
        with torch.no_grad():
            x_in = quant.var_input(quant.lookup_scales(tokens))
        logits_BLV = var(labels, x_in)
        loss = F.cross_entropy(logits_BLV.reshape(-1, VAR_CFG.vocab_size), tokens.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        if (step + 1) % 300 == 0:
            log(f"  transformer step {step + 1}/{steps}: cross-entropy {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return var.eval()


# ---- evaluation and outputs -----------------------------------------------------------------------

def save_grid(images_B3HW: torch.Tensor, rows: int, path: Path, zoom: int = 4, pad: int = 1) -> None:
    """Rows × (B / rows) grid with a grey gap between tiles, nearest-neighbour zoom for 16-px digits."""
    B, _, H, W = images_B3HW.shape
    cols = B // rows
    tiles = F.pad(images_B3HW[: rows * cols].clamp(0, 1), (pad, pad, pad, pad), value=0.35)
    h, w = H + 2 * pad, W + 2 * pad
    grid = tiles.reshape(rows, cols, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)
    arr = (grid * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr).resize((cols * w * zoom, rows * h * zoom), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@torch.no_grad()
def evaluate(teacher: VarTeacher, per_class: int, seed: int) -> dict:
    out: dict = {}
    held_x, held_y = load_digits_dataset(16, "heldout")
    recon = teacher.decode(teacher.encode(held_x))
    out["heldout_recon_mse"] = F.mse_loss(recon, held_x).item()
    out["heldout_recon_mae"] = (recon - held_x).abs().mean().item()
    try:
        clf = load_digits_classifier()
    except Exception as exc:  # the classifier ships separately; report instead of failing
        out["classifier"] = f"unavailable ({exc})"
        return out
    out["classifier_accuracy_heldout_real"] = (clf.predict(held_x) == held_y).float().mean().item()
    out["classifier_accuracy_heldout_recon"] = (clf.predict(recon) == held_y).float().mean().item()
    labels = torch.arange(10).repeat_interleave(per_class)
    for name, settings in (("evaluation", DIGITS_EVALUATION), ("stage1", DIGITS_STAGE1)):
        gen = torch.Generator().manual_seed(seed)
        images = teacher.decode(teacher.sample(labels, settings, generator=gen))
        out[f"class_consistency_{name}"] = (clf.predict(images) == labels).float().mean().item()
        out[f"settings_{name}"] = settings.as_dict()
    return out


def save_weights(var: VAR, vae: VQVAE, out_dir: Path, training: dict) -> None:
    """fp16 safetensors (the loader computes in fp32; halves the bundled size) + the JSON config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"variant": "var-digits", "trained_by": "examples/train_var_digits.py", "stored_dtype": "float16"}
    for name, module in (("transformer", var), ("vae", vae)):
        state = {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
        path = out_dir / f"var_digits_{name}.safetensors"
        save_safetensors(path, state, meta)
        path.chmod(0o644)  # package data must be readable by every user of an installed copy
    write_json(out_dir / "var_digits.json", {"var": VAR_CFG.to_dict(), "vae": VAE_CFG.to_dict(), "training": training})
    (out_dir / "var_digits.json").chmod(0o644)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-steps", type=int, default=600)
    parser.add_argument("--transformer-steps", type=int, default=1200)
    parser.add_argument("--augmented-copies", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--samples-png", type=Path, default=ROOT / "docs" / "var-digits-samples.png")
    parser.add_argument("--eval-per-class", type=int, default=100)
    parser.add_argument("--evaluate-only", action="store_true",
                        help="skip training: evaluate the weights in --out-dir and redraw the sample grid")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config_path = args.out_dir / "var_digits.json"
    if args.evaluate_only:
        training = read_json(config_path)["training"]
    else:
        gen = torch.Generator().manual_seed(args.seed)
        images, labels = load_digits_dataset(16, "train")
        t_start = time.time()

        print(f"1. tokenizer ({sum(p.numel() for p in VQVAE(VAE_CFG).parameters()):,} params)")
        vae = train_tokenizer(images, args.tokenizer_steps, gen).requires_grad_(False)
        t_tok = time.time() - t_start

        ids_BL, labels_B = tokenize(vae, images, labels, args.augmented_copies, gen)
        print(f"2. transformer ({sum(p.numel() for p in VAR(VAR_CFG).parameters()):,} params) "
              f"on {len(ids_BL)} sequences")
        var = train_transformer(vae, ids_BL, labels_B, args.transformer_steps, gen)
        t_total = time.time() - t_start
        training = {
            "seed": args.seed,
            "tokenizer_steps": args.tokenizer_steps,
            "transformer_steps": args.transformer_steps,
            "augmented_copies": args.augmented_copies,
            "tokenizer_seconds": round(t_tok, 1),
            "total_seconds": round(t_total, 1),
            "threads": 1,
        }
        save_weights(var, vae, args.out_dir, training)
        print(f"wrote {args.out_dir} (training {t_total:.0f}s)")

    # 3. evaluate what ships: reload the saved (fp16-stored) files the way the plugin does
    var, vae = build_bundled(config_path, args.out_dir / "var_digits_transformer.safetensors",
                             args.out_dir / "var_digits_vae.safetensors", variant_name="var-digits")
    teacher = VarTeacher(var, vae, variant_name="var-digits")
    print("3. evaluation")
    metrics = evaluate(teacher, args.eval_per_class, args.seed)
    for k, v in metrics.items():
        print(f"  {k}: {v}")
    write_json(config_path, {**read_json(config_path), "metrics": metrics})
    config_path.chmod(0o644)

    gen = torch.Generator().manual_seed(args.seed)
    grid_labels = torch.arange(10).repeat_interleave(10)
    grid = teacher.decode(teacher.sample(grid_labels, DIGITS_EVALUATION, generator=gen))
    save_grid(grid, rows=10, path=args.samples_png)
    print(f"wrote {config_path} and {args.samples_png}")


if __name__ == "__main__":
    main()
