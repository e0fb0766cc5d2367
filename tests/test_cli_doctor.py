"""`crepa-mem doctor` through the real command: every fixture in --json and human modes, exit codes, bad usage."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crepa_mem.cli.app import app

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
WAN_CONFIG = Path(__file__).parent / "fixtures" / "simpletuner" / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json"
runner = CliRunner()


def doctor(*args: str, input: bytes | None = None):
    return runner.invoke(app, ["doctor", *args], input=input)


def _codes(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report["findings"]:
        out.setdefault(f["code"], set()).add(f["severity"])
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED["logs"]))
def test_log_fixture_json(name):
    want = EXPECTED["logs"][name]
    res = doctor("--log", str(FIXTURES / name), "--json", "--no-machine")
    assert res.exit_code == want["exit"], res.output
    report = json.loads(res.stdout)
    assert _codes(report) == {c: {s} for c, s in want["codes"].items()}
    assert not set(want.get("not", ())) & set(_codes(report))
    assert report["summary"]["log"]["source"] == str(FIXTURES / name)
    for f in report["findings"]:
        assert set(f) >= {"code", "severity", "message", "fix"} and f["message"] and f["fix"]
    oom = [f for f in report["findings"] if f["code"] == "oom"]
    assert [f["phase"] for f in oom] == ([want["phase"]] if "phase" in want else [])


@pytest.mark.parametrize("name", sorted(EXPECTED["logs"]))
def test_log_fixture_human(name):
    want = EXPECTED["logs"][name]
    res = doctor("--log", str(FIXTURES / name), "--no-machine")
    assert res.exit_code == want["exit"]
    out = res.stdout
    assert out.startswith("crepa-mem doctor:")
    for code, severity in want["codes"].items():
        assert f"{severity} {code}" in out
    if "phase" in want:
        assert f"oom (phase {want['phase']})" in out
    severities = [line.split()[1] for line in out.splitlines() if line[:1] and line[:1] in "✖▲•"]
    order = {"error": 0, "warning": 1, "info": 2}
    assert severities == sorted(severities, key=order.get)  # errors first


@pytest.mark.parametrize("name", sorted(EXPECTED["configs"]))
def test_config_fixture(name, primed):
    want = EXPECTED["configs"][name]
    res = doctor("--config", str(FIXTURES / name), "--json", "--no-machine")
    assert res.exit_code == want["exit"], res.output
    report = json.loads(res.stdout)
    assert _codes(report) == {c: {s} for c, s in want["codes"].items()}
    assert not set(want.get("not", ())) & set(_codes(report))
    for code, n in want.get("count", {}).items():
        assert sum(f["code"] == code for f in report["findings"]) == n
    human = doctor("--config", str(FIXTURES / name), "--no-machine")
    assert human.exit_code == want["exit"]
    for code in want["codes"]:
        assert code in human.stdout


def test_oom_with_config_gives_the_plan_command_and_settings(primed):
    res = doctor("--config", str(WAN_CONFIG), "--log", str(FIXTURES / "oom_vae_decode_wan_rtx4090.log"), "--json",
                 "--no-machine")
    assert res.exit_code == 1
    (oom,) = [f for f in json.loads(res.stdout)["findings"] if f["code"] == "oom"]
    assert oom["phase"] == "vae_decode"
    cmd = oom["details"]["plan_command"]
    assert cmd.startswith("crepa-mem plan --model wan-2.1-1.3b --gpu 23.53GiB --frames 81 --height 480 --width 832")
    assert cmd in oom["fix"]
    if oom["details"]["plan_fits"]:
        for key, value in oom["details"]["settings"].items():
            if value is not None:
                assert f'"{key}": {json.dumps(value)}' in oom["fix"]


def test_stdin_log_and_model_flag():
    data = (FIXTURES / "block_index_wan.log").read_bytes()
    res = doctor("--log", "-", "--model", "wan-2.1-14b", "--json", "--no-machine", input=data)
    assert res.exit_code == 1
    (f,) = json.loads(res.stdout)["findings"]
    assert f["code"] == "block_index_out_of_range" and f["details"]["valid_range"] == [0, 39]


def test_machine_checks_run_without_crashing():
    res = doctor("--json")
    assert res.exit_code in (0, 1), res.output
    codes = {f["code"] for f in json.loads(res.stdout)["findings"]}
    assert "package_versions" in codes


@pytest.mark.parametrize("args, needle", [
    (["--log", "/nonexistent/train.log"], "No such file"),
    (["--config", "/nonexistent/config.json"], "--config"),
    (["--model", "wan-9000"], "unknown model"),
    (["--gpu", "rtx4091"], "unknown GPU"),
])
def test_bad_usage_is_one_line_and_exit_2(args, needle):
    res = doctor(*args, "--no-machine")
    assert res.exit_code == 2
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_bad_json_config_and_bad_numbers(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{ not json")
    res = doctor("--config", str(bad), "--no-machine")
    assert res.exit_code == 2 and "JSON" in res.stderr
    assert doctor("--frames", "0", "--no-machine").exit_code == 2
    assert doctor("--no-such-flag").exit_code == 2


def test_installed_entry_point_reads_stdin():
    exe = Path(sys.executable).with_name("crepa-mem")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "crepa_mem.cli.app"]
    proc = subprocess.run([*cmd, "doctor", "--log", "-", "--json", "--no-machine"],
                          input=(FIXTURES / "oom_projector_sana_l40s.log").read_bytes(), capture_output=True)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert [(f["code"], f["phase"]) for f in report["findings"]] == [("oom", "projector")]


def _entry_point():
    exe = Path(sys.executable).with_name("crepa-mem")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "crepa_mem.cli.app"]


def _close_stdin():
    import os

    os.close(0)  # `crepa-mem doctor --log - <&-`


def test_log_from_a_closed_stdin_is_one_line_exit_2():
    proc = subprocess.run([*_entry_point(), "doctor", "--log", "-", "--no-machine"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, preexec_fn=_close_stdin)
    assert proc.returncode == 2 and "standard input" in proc.stderr and "Traceback" not in proc.stderr


def test_a_tier_given_a_list_and_a_deeply_nested_config_are_one_line(tmp_path):
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps({"crepa_enabled": True, "crepa_mem_vae_tier": ["gpu"]}))
    res = doctor("--config", str(listed), "--no-machine", "--json")
    assert res.exit_code == 1 and "crepa_mem_vae_tier" in res.stdout  # an invalid_option finding, no crash
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    res = doctor("--config", str(deep), "--no-machine")
    assert res.exit_code == 2 and "nested" in res.stderr and len(res.stderr.strip().splitlines()) == 1
