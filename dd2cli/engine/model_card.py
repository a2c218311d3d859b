"""The README.md of a bundle: YAML front matter for model hubs, then what the generator is, its teacher, how it
was trained, the run's metrics, the files, and how to load it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .bundle import CARD, CODEBOOK, CONFIG, DECODER, GENERATOR, MARKER, PT2, SAMPLES


def human_size(n: int) -> str:
    """Bytes as KiB / MiB / GiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _front_matter(config: Mapping[str, Any]) -> list[str]:
    """YAML front matter, as model hubs read it (library, licence, base model, pipeline tag, tags)."""
    lines = ["---", "library_name: dd2", f"license: {config.get('license') or 'other'}"]
    if config.get("base_model"):
        lines.append(f"base_model: {config['base_model']}")
    lines += ["pipeline_tag: unconditional-image-generation", "tags:", "- dd2", "- distilled-decoding",
              "- one-step", "- class-conditional", f"- {config['teacher']}", "---"]
    return lines


def model_card(config: Mapping[str, Any], sizes: Mapping[str, int], evals: Sequence[Mapping[str, Any]],
               losses: Mapping[str, Any], folder: str) -> str:
    """README.md of a bundle: what it is, teacher, training, metrics, files, how to load it."""
    spec, dist = config["spec"], config["distillation"]
    s = dist["settings"]
    s1, s2, run, w = s["stage1"], s["stage2"], config["run"], config["weights"]
    teacher = config["teacher"]
    ident = config.get("teacher_identity") or {}
    lines = [*_front_matter(config), "",
        f"# dd2 one-step generator: {teacher}",
        "",
        f"A one-step image generator distilled with Distilled Decoding 2 (DD2) from the auto-regressive teacher "
        f"**{teacher}** (family `{config.get('family') or '?'}`). One forward pass maps a class label and "
        f"Gaussian noise `({spec['num_tokens']}, {spec['latent_dim']})` to {spec['num_tokens']} continuous tokens; "
        f"each is snapped to the nearest of the teacher's {spec['vocab_size']} codebook vectors and the "
        f"teacher's tokenizer decoder turns them into a {spec['image_size']}×{spec['image_size']} RGB image. "
        f"The teacher needs {spec['num_steps']} AR steps for the same job.",
        "",
        f"Exported by dd2 {config['dd2_version']} on {config['created']} (bundle format "
        f"{config['format_version']}).",
        "",
    ]
    if SAMPLES in sizes:
        lines += [f"![samples of the run]({SAMPLES})", "", "Samples of the run's EMA generator (one row per class).", ""]
    lines += ["## Teacher", "", "| | |", "|---|---|",
              f"| variant | `{teacher}` |", f"| family | `{config.get('family') or '?'}` |",
              f"| tokens × AR steps | {spec['num_tokens']} × {spec['num_steps']} |",
              f"| codebook | {spec['vocab_size']} × {spec['latent_dim']} |",
              f"| classes | {spec['num_classes']} (null class {spec['null_class']}) |",
              f"| image size | {spec['image_size']} px |"]
    for key, value in sorted((ident.get("weights") or {}).items()):
        shown = value
        if isinstance(value, dict):
            digest = value.get("sha256") or value.get("fingerprint") or ""
            shown = f"{value.get('file', '')} sha256 {digest[:16]}…" if digest else value.get("file", "")
        elif isinstance(value, str) and len(value) == 64:
            shown = f"sha256 {value[:16]}…"
        lines.append(f"| weights `{key}` | {shown} |")
    lines += ["", "The full teacher identity (file hashes) is in `config.json` → `teacher_identity`.", "",
              "## Training", "",
              f"- distillation target (teacher sampling): {_sampling_text(dist['resolved_target'])}",
              f"- stage 1 (GTS initialisation): {s1['steps']} steps, batch {s1['batch_size']}, head lr {s1['lr']}, "
              f"backbone lr {s1['backbone_lr']}, head-only steps {s1['head_only_steps']}, data: "
              f"{'teacher samples' if s1['data'] == 'teacher' else s1['data']} "
              f"({_sampling_text(dist['resolved_stage1_data'])})",
              f"- stage 2 (conditional score distillation): {s2['steps']} generator updates, batch {s2['batch_size']}, "
              f"lr {s2['lr']}, guidance lr {s2['guidance_lr']}, {s2['guidance_updates']} guidance updates per "
              f"generator update, α {s2['alpha']}, EMA cap {s2['ema_max']}",
              f"- head: MLP width {config['head']['width']}, depth {config['head']['depth']}; precision "
              f"{s.get('precision', 'fp32')}; seed {s.get('seed')}",
              f"- exported weights: **{w['which']}** generator of checkpoint `{run.get('checkpoint')}` "
              f"(stage {run.get('checkpoint_stage')}, step {run.get('checkpoint_step')}), stored as {w['dtype']} "
              f"(the codebook stays fp32; loading computes in fp32)",
              ""]
    check = config.get("check") or {}
    if check.get("max_abs_pixel_diff_vs_run") is not None:
        lines += [f"Check at export: the bundle's images differ from the run's by at most "
                  f"{check['max_abs_pixel_diff_vs_run']:.3g} (pixel values in [0, 1]) on a fixed batch.", ""]
    lines += ["## Metrics", ""]
    if evals:
        lines += ["Measured with `dd2 eval` on sample sets of the run (not re-measured on this bundle):", "",
                  "| samples | mode | weights | step | count | features | metrics |", "|---|---|---|---|---|---|---|"]
        for e in evals:
            metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in e["metrics"].items())
            mode = f"{e.get('mode') or '?'}" + (f" ({e['steps']} steps)" if (e.get("steps") or 1) > 1 else "")
            lines.append(f"| {e['samples']} | {mode} | {e.get('weights') or '-'} | {e.get('checkpoint_step') or '-'} | "
                         f"{e.get('count')} | {e.get('features')} | {metrics} |")
        lines.append("")
    else:
        lines += ["No `dd2 eval` results were found in the run directory. Measure this bundle with "
                  f"`dd2 sample --from {folder} -n 50000` and `dd2 eval fid ...`.", ""]
    if losses:
        parts = [f"stage {k[-1]} step {v.get('step')}: " + ", ".join(f"{n[5:]} {_fmt(x)}" for n, x in v.items()
                                                                       if n.startswith("loss_"))
                 for k, v in sorted(losses.items())]
        lines += ["Last logged training losses — " + "; ".join(parts) + ".", ""]
    lines += ["## Files", "", "| file | size | what |", "|---|---|---|"]
    what = {GENERATOR: f"generator weights ({w['dtype']})", DECODER: f"tokenizer decoder: ids → images ({w['dtype']})",
            CODEBOOK: "codebook (V, d) fp32 for the nearest-codebook lookup",
            CONFIG: "architecture (factories + configs), spec, provenance",
            SAMPLES: "sample grid of the run", PT2: "torch.export program (no dd2 needed)"}
    for name, size in sizes.items():
        lines.append(f"| `{name}` | {human_size(size)} | {what.get(name, '')} |")
    lines += [f"| `{MARKER}` | – | marker and content hash |", f"| `{CARD}` | – | this card |", ""]
    k = min(3, spec["num_classes"])
    labels, size = list(range(k)), spec["image_size"]
    lines += ["## Use", "", "With the dd2 command line (PNGs + an ADM `.npz` + a manifest):", "", "```sh",
              f"dd2 sample --from {folder} -n 1000 --out samples/", "```", "",
              "With Python (needs `dd2` and the teacher's plugin package installed, not the teacher weights):", "",
              "```python", "import dd2cli", "", f"gen = dd2cli.load_generator(\"{folder}\", device=\"cpu\")",
              f"images = gen({labels}, seed=0)  # ({k}, 3, {size}, {size}) float32 in [0, 1]",
              f"noise = gen.noise({k}, seed=0)  # ({k}, {spec['num_tokens']}, {spec['latent_dim']}) standard normal",
              f"same = gen.generate({labels}, noise)  # explicit noise: the same images", "```", "",
              "`seed` draws the whole batch from one CPU generator; `dd2 sample` seeds every image by its index "
              "instead, so the two give different images for the same seed.", ""]
    pt2_info = config.get("pt2") or {}
    pt2 = pt2_info.get("batch")
    if pt2 is not None:
        batch_note = ("any batch size (dynamic batch dimension)" if pt2 == "dynamic" else
                      f"a fixed batch of {pt2} (torch.export could not make the batch dimension dynamic for this "
                      f"model; call it once per image)")
        lines += ["With plain PyTorch, no dd2 installed (`generator.pt2`, a `torch.export` program of generator + "
                  f"nearest-codebook lookup + decoder; it takes {batch_note}):", "", "```python", "import torch", "",
                  f"program = torch.export.load(\"{folder}/{PT2}\").module()",
                  "labels = torch.tensor([0, 1], dtype=torch.int64)",
                  f"noise = torch.randn(2, {spec['num_tokens']}, {spec['latent_dim']})",
                  f"images = program(labels, noise)  # uint8 (2, {spec['image_size']}, {spec['image_size']}, 3)",
                  "```", "", "The program holds its own fp32 copy of the weights, on the CPU; it was exported with "
                  f"PyTorch {pt2_info.get('torch_version')} (load it with that version or a newer one).", "",
                  "**Loading a `.pt2` file runs code.** Load `generator.pt2` only if you trust where this bundle "
                  "came from; the safetensors files with `dd2cli.load_generator` are the safe way to use a "
                  "generator from elsewhere (they hold tensors only, and dd2 checks them against the content hash "
                  "in `bundle.json`).", ""]
    return "\n".join(lines)


def _sampling_text(s: Mapping[str, Any]) -> str:
    parts = [f"cfg {s.get('cfg')}", f"top-k {s.get('top_k') or 'off'}",
             f"top-p {s.get('top_p') if s.get('top_p', 1.0) < 1.0 else 'off'}"]
    if s.get("temperature", 1.0) != 1.0:
        parts.append(f"temperature {s['temperature']}")
    if s.get("cfg_interval", -1) >= 0:
        parts.append(f"cfg interval {s['cfg_interval']}")
    return ", ".join(parts)
