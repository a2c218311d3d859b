"""`dd2 teachers`, `dd2 plugins`, `dd2 inspect`: what is installed, and what a weights file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import console, handle_errors, show
from .downloads import hub_cache_dir, is_offline
from .files import load_foreign_checkpoint, load_safetensors
from .plugins import list_plugins, registry
from .teachers import WeightFile, default_weights_dir


@handle_errors
def teachers(
    name: Optional[str] = typer.Argument(None, help="Show only this variant (or family)."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Folder with official weight files "
                                               "(default: $DD2_WEIGHTS_DIR or ~/.cache/dd2/weights)."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print machine-readable JSON."),
) -> None:
    """List installed teacher families and variants, the weight files each needs, and whether they are found
    (locally, in the Hugging Face hub cache) or will be downloaded on first use."""
    reg = registry()
    wdir = weights_dir or default_weights_dir()
    offline = is_offline()
    selected = {reg.get(name).name} if name and name not in reg.families else None
    rows = []
    for fam in sorted(reg.families.values(), key=lambda f: f.name):
        if name and name in reg.families and fam.name != name:
            continue
        for v in fam.variants:
            if selected is not None and v.name not in selected:
                continue
            files = [_file_row(w, wdir, offline) for w in v.weights]
            rows.append({"family": fam.name, "plugin": fam.plugin, "variant": v.name,
                         "description": v.description, "image_size": v.image_size,
                         "ready": all(f["path"] for f in files), "weights": files})
    if as_json:
        console.print_json(json.dumps({"weights_dir": str(wdir), "hub_cache": str(hub_cache_dir()), "offline": offline,
                                       "teachers": rows}))
        return
    if not rows:
        console.print("No teachers installed. Install a teacher plugin (see 'dd2 plugins').")
        return
    table = Table(title="Teachers")
    for col in ("variant", "family", "px", "weights", "description"):
        table.add_column(col, overflow="fold")
    any_missing = any_download = False
    for r in rows:
        parts = []
        for f in r["weights"]:
            if f["status"] == "bundled":
                parts.append(f"[green]{f['key']}: bundled[/green]")
            elif f["status"] == "found":
                parts.append(f"[green]{escape(f['key'])}: {escape(f['filename'])} ✓[/green]")
            elif f["status"] == "cached":
                parts.append(f"[green]{escape(f['key'])}: {escape(f['filename'])} ✓ (hub cache)[/green]")
            elif f["status"] == "download":
                any_download = True
                parts.append(f"[yellow]{escape(f['key'])}: {escape(f['filename'])} downloaded on first use from "
                             f"{escape(f['hf_repo'])}[/yellow]")
            else:
                any_missing = True
                parts.append(f"[red]{escape(f['key'])}: {escape(f['filename'])} missing[/red]")
        table.add_row(r["variant"], r["family"], str(r["image_size"] or ""), "\n".join(parts) or "none",
                      r["description"])
    console.print(table)
    if any_download:
        show(f"Files marked 'downloaded on first use' are fetched from the Hugging Face hub into {hub_cache_dir()} "
             f"the first time a command needs them (dd2 --offline or DD2_OFFLINE=1 never downloads).")
    if any_missing:
        show(f"Missing weight files are looked up in {wdir} (set $DD2_WEIGHTS_DIR or use --weights-dir), "
                      f"or pass them explicitly with --weights KEY=PATH; 'dd2 teachers --json' lists the download URLs.")


def _file_row(w: WeightFile, wdir: Path, offline: bool) -> dict:
    """Where one weight file stands: bundled, found locally, in the hub cache, downloaded on first use, or missing."""
    local = w.locate(weights_dir=wdir, hub_cache=False)
    cached = None if local else w.hub_cached()
    if w.bundled is not None:
        status = "bundled"
    elif local:
        status = "found"
    elif cached:
        status = "cached"
    elif w.hf_repo and not offline:
        status = "download"
    else:
        status = "missing"
    return {
        "key": w.key, "filename": w.filename, "description": w.description, "url": w.url,
        "bundled": w.bundled is not None, "status": status,
        "path": str(local or cached) if (local or cached) else None,
        "expected": str(w.expected_location(wdir)),
        "hf_repo": w.hf_repo or None, "hf_filename": w.hub_filename if w.hf_repo else None,
        "revision": w.revision if w.hf_repo else None,
    }


@handle_errors
def plugins(as_json: bool = typer.Option(False, "--json", metavar="", help="Print machine-readable JSON.")) -> None:
    """List installed plugins, their versions and the hooks they implement."""
    infos = list_plugins()
    if as_json:
        console.print_json(json.dumps([
            {"name": p.name, "hooks": list(p.hooks), "version": p.version, "distribution": p.distribution}
            for p in infos]))
        return
    table = Table(title="Plugins")
    for col in ("name", "distribution", "version", "hooks"):
        table.add_column(col)
    for p in infos:
        table.add_row(p.name, p.distribution or "-", p.version or "-", ", ".join(p.hooks))
    console.print(table)


@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="A .safetensors file written by dd2, or an official .pth/.pt checkpoint."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print machine-readable JSON."),
) -> None:
    """Check that a weights file is readable (integrity, plain weights only) and list its tensors."""
    if path.suffix == ".safetensors":
        tensors, metadata = load_safetensors(path)
    else:
        tensors, metadata = load_foreign_checkpoint(path, what="checkpoint"), {}
    entries = [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
               for k, v in tensors.items()]
    total = sum(v.numel() for v in tensors.values())
    if as_json:
        console.print_json(json.dumps({"path": str(path), "tensors": entries, "numel": total, "metadata": metadata}))
        return
    table = Table(title=escape(f"{path} ({len(entries)} tensors, {total:,} values)"))
    for col in ("key", "shape", "dtype"):
        table.add_column(col)
    for e in entries:
        table.add_row(escape(e["key"]), str(tuple(e["shape"])), e["dtype"])
    console.print(table)
