"""`dd2 teachers`, `dd2 plugins`, `dd2 inspect`: what is installed, and what a weights file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import console, handle_errors, show
from .files import load_foreign_checkpoint, load_safetensors
from .plugins import list_plugins, registry
from .teachers import default_weights_dir


@handle_errors
def teachers(
    name: Optional[str] = typer.Argument(None, help="Show only this variant (or family)."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Folder with official weight files "
                                               "(default: $DD2_WEIGHTS_DIR or ~/.cache/dd2/weights)."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print machine-readable JSON."),
) -> None:
    """List installed teacher families and variants, the weight files each needs, and whether they are found."""
    reg = registry()
    wdir = weights_dir or default_weights_dir()
    selected = {reg.get(name).name} if name and name not in reg.families else None
    rows = []
    for fam in sorted(reg.families.values(), key=lambda f: f.name):
        if name and name in reg.families and fam.name != name:
            continue
        for v in fam.variants:
            if selected is not None and v.name not in selected:
                continue
            found = v.locate_weights(weights_dir=wdir)
            files = [{
                "key": w.key, "filename": w.filename, "description": w.description, "url": w.url,
                "bundled": w.bundled is not None,
                "path": str(found[w.key]) if found[w.key] else None,
                "expected": str(w.expected_location(wdir)),
            } for w in v.weights]
            rows.append({"family": fam.name, "plugin": fam.plugin, "variant": v.name,
                         "description": v.description, "image_size": v.image_size,
                         "ready": all(f["path"] for f in files), "weights": files})
    if as_json:
        console.print_json(json.dumps({"weights_dir": str(wdir), "teachers": rows}))
        return
    if not rows:
        console.print("No teachers installed. Install a teacher plugin (see 'dd2 plugins').")
        return
    table = Table(title="Teachers")
    for col in ("variant", "family", "px", "weights", "description"):
        table.add_column(col, overflow="fold")
    any_missing = False
    for r in rows:
        parts = []
        for f in r["weights"]:
            if f["bundled"]:
                parts.append(f"[green]{f['key']}: bundled[/green]")
            elif f["path"]:
                parts.append(f"[green]{f['key']}: {f['filename']} ✓[/green]")
            else:
                any_missing = True
                parts.append(f"[red]{f['key']}: {f['filename']} missing[/red]")
        table.add_row(r["variant"], r["family"], str(r["image_size"] or ""), "\n".join(parts) or "none",
                      r["description"])
    console.print(table)
    if any_missing:
        show(f"Missing weight files are looked up in {wdir} (set $DD2_WEIGHTS_DIR or use --weights-dir), "
                      f"or pass them explicitly with --weights KEY=PATH; 'dd2 teachers --json' lists the download URLs.")


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
