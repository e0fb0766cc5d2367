"""`crepa-mem gpus`: what NVML (or, without it, torch) says about the GPUs."""
from __future__ import annotations

from typing import Optional

import typer

from crepa_mem.cli._errors import user_errors
from crepa_mem.cli._output import console, emit_json, human_bytes


def register(app: typer.Typer) -> None:
    @app.command("gpus")
    @user_errors
    def gpus_cmd(
        gpu: str = typer.Option("all", "--gpu", help="all, auto, an index, a catalog name or a size."),
        profiles: Optional[list[str]] = typer.Option(None, "--profiles", help="Directory of extra profile *.toml files."),
        as_json: bool = typer.Option(False, "--json", help="Print the inspection as JSON."),
    ) -> None:
        """GPU inspection: memory (total / free / reserved), compute capability, PCIe link, other processes."""
        from crepa_mem.planning.devices import inspect_gpus, why_no_gpu

        found = inspect_gpus(gpu, profiles_dir=profiles or None, allow_torch=True)
        note = "" if found else f"no GPU found: {why_no_gpu() or 'none visible'}"
        if as_json:
            emit_json({"gpus": [d.to_dict() for d in found], "note": note})
        elif not found:
            typer.echo(f"crepa-mem: {note}", err=True)
        else:
            _print(found)


def _print(devices) -> None:
    """One key/value table per GPU: readable in any terminal width."""
    from rich.table import Table

    out = console()
    for d in devices:
        where = f"GPU {d.index}" if d.index is not None else "GPU"
        where += f" (cuda:{d.cuda_index})" if d.cuda_index is not None else ""
        t = Table(title=f"{where}: {d.name}", show_header=False, title_justify="left")
        t.add_row("memory", f"{human_bytes(d.total_bytes)} total, {human_bytes(d.free_bytes)} free, "
                            f"{human_bytes(d.used_bytes)} used, {human_bytes(d.reserved_bytes)} reserved")
        t.add_row("compute capability", d.compute_capability or "—")
        pcie = f"Gen{d.pcie_gen} x{d.pcie_width}" if d.pcie_gen else "unknown"
        if d.h2d_bytes_per_s:
            pcie += f", ~{d.h2d_bytes_per_s / 1e9:.0f} GB/s host→device"
        t.add_row("PCIe", pcie)
        t.add_row("processes", ", ".join(f"pid {pid}: {human_bytes(used)}" for pid, used in d.processes) or "none")
        t.add_row("uuid", d.uuid or "—")
        t.add_row("catalog", d.catalog_name or "—")
        t.add_row("source", d.source + (f" ({d.note})" if d.note else ""))
        out.print(t)
