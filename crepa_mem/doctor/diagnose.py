"""`crepa-mem doctor`: findings from a training log, a config and the live machine.

The work is split by source: `diagnose_logs` (the streamed log; `diagnose_rules` recognises each
failure on a line, `diagnose_fixes` turns events into findings, the OOM fix through the planner),
`diagnose_config` (SimpleTuner / crepa-mem config checks), `diagnose_machine` (NVML, torch build,
pinned memory, package versions).
What they share — `Finding`, the `Context` they read — lives below them in `findings`; this module
holds `diagnose()`, which runs them and sorts the findings.
No torch here: only the machine check imports it, lazily.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from crepa_mem.doctor.findings import PHASES, SEVERITIES, SUPPORTED_FAMILIES, Context, Finding, normalise_keys  # noqa: F401
from crepa_mem.errors import CrepaConfigError
from crepa_mem.units import parse_size

# ---------------------------------------------------------------------------- the report

@dataclass
class Diagnosis:
    findings: list[Finding]
    summary: dict[str, Any]

    @property
    def exit_code(self) -> int:
        """1 when any finding is an error, else 0."""
        return 1 if any(f.severity == "error" for f in self.findings) else 0

    def to_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings], "summary": dict(self.summary)}


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Errors first, then warnings, then info; the order found within each."""
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def _resolve_model(name: str | None, config: Mapping[str, Any]) -> tuple[Any, str | None, str | None]:
    """(profile or None, raw model_family, note). A bad --model is bad usage (raises); a config whose
    family/flavour is not in the catalog is a finding, not an exception."""
    from crepa_mem.errors import ProfileNotFoundError
    from crepa_mem.profiles import get_model, model_from_simpletuner

    family = config.get("model_family")
    family = str(family).strip().lower() if family else None
    if name:
        return get_model(name), family, None
    if not family:
        return None, None, None
    if family not in SUPPORTED_FAMILIES:
        return None, family, None
    try:
        return model_from_simpletuner(family, config.get("model_flavour") or None), family, None
    except ProfileNotFoundError as e:
        return None, family, str(e)


def read_config(path: str | Path) -> dict[str, Any]:
    """The config file as a dict with normalised keys; bad files are bad input (exit 2)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise CrepaConfigError("--config", str(p), valid="an existing JSON file") from None
    except IsADirectoryError:
        raise CrepaConfigError("--config", str(p), valid="a JSON file, not a directory") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CrepaConfigError("--config", str(p), valid=f"JSON ({e})") from None
    except RecursionError:
        raise CrepaConfigError("--config", str(p), valid="JSON nested less deeply") from None
    if not isinstance(data, dict):
        raise CrepaConfigError("--config", str(p), valid="a JSON object (a SimpleTuner config.json)")
    return normalise_keys(data)


def check_gpu_argument(gpu: str | None) -> str | None:
    """--gpu: 'auto', an index, a size ('24GiB') or a catalog name; anything else is bad usage."""
    if gpu is None or gpu == "auto" or re.fullmatch(r"\d+", gpu):
        return gpu
    try:
        parse_size(gpu)
        return gpu
    except ValueError:
        from crepa_mem.profiles import get_gpu
        return get_gpu(gpu).name  # ProfileNotFoundError (exit 2) suggests close names


def diagnose(*, config: str | Path | Mapping[str, Any] | None = None, log: Any = None,
             model: str | None = None, gpu: str | None = None, frames: int | None = None,
             height: int | None = None, width: int | None = None, machine: bool = True,
             machine_probe: Any = None) -> Diagnosis:
    """Runs every check that has something to read and returns the sorted findings.

    config: a path or an already-read dict. log: a path, '-' (stdin), a binary/text stream or an
    iterable of lines. machine: run the live checks (NVML, torch, ulimit, versions);
    machine_probe: a `diagnose_machine.MachineProbe` to inject (tests)."""
    from crepa_mem.doctor import config_checks as diagnose_config, logs as diagnose_logs

    cfg = {} if config is None else (normalise_keys(config) if isinstance(config, Mapping) else read_config(config))
    gpu = check_gpu_argument(gpu)
    profile, family, note = _resolve_model(model, cfg)
    ctx = Context(model=profile, model_family=family, model_note=note, gpu=gpu,
                  frames=frames, height=height, width=width, config=cfg)

    findings: list[Finding] = []
    summary: dict[str, Any] = {"model": profile.name if profile else None, "gpu": gpu}
    if config is not None or frames or height or width:
        findings += diagnose_config.check_config(ctx)
    if log is not None:
        scan = diagnose_logs.scan_log(log)
        findings += diagnose_logs.findings_from_scan(scan, ctx)
        summary["log"] = scan.summary()
    if machine:
        from crepa_mem.doctor import machine as diagnose_machine
        # an OOM fix's plan picks tiers: judge pinned memory and host RAM for those, not only the config's
        planned = next((f.details["settings"] for f in findings
                        if f.code == "oom" and f.details.get("plan_fits")), {})
        tiers = {k: v for k, v in planned.items() if k.startswith("crepa_mem_") and v is not None}
        mctx = replace(ctx, config={**cfg, **tiers}) if tiers else ctx
        findings += diagnose_machine.check_machine(mctx, probe=machine_probe)
    findings = sort_findings(findings)
    for sev in SEVERITIES:
        summary[sev + "s" if sev != "info" else "info"] = sum(f.severity == sev for f in findings)
    summary["exit_code"] = 1 if summary["errors"] else 0
    return Diagnosis(findings, summary)
