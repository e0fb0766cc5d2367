"""The app as a user meets it: --version, help that keeps its defaults and shows flags as flags,
one-line usage errors, 80-column output that folds instead of truncating, no trailing spaces."""
from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from crepa_mem import __version__
from crepa_mem.cli.app import app

runner = CliRunner()


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"crepa-mem {__version__}"


def test_help_keeps_defaults_and_shows_flags_without_a_value(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = runner.invoke(app, ["cache", "build", "--help"]).stdout
    assert "(default: dinov2_vitg14 or --config's)" in text and "(default: fp32 or --config's)" in text
    assert "(default: cuda if present" in text
    json_line = next(line for line in text.splitlines() if "--json" in line)
    assert "<bool>" not in json_line and "BOOLEAN" not in json_line


@pytest.mark.parametrize("args", [["plan", "--model", "wan", "--frames", "x"], ["nope"],
                                  ["cache", "build", "--latents"]])
def test_usage_errors_are_one_line_and_exit_2(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("crepa-mem: error: ") and "╭" not in res.stderr


def test_profiles_at_80_columns_fold_rather_than_truncate_and_have_no_trailing_spaces(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = runner.invoke(app, ["profiles"]).stdout
    assert "…" not in out and "kandinsky5-video-lite *" in out
    assert all(len(line) <= 80 and line == line.rstrip(" ") for line in out.splitlines())


def test_doctor_redirected_has_no_trailing_spaces():
    from pathlib import Path

    config = Path(__file__).parent / "fixtures" / "doctor" / "config_bad_options.json"
    out = runner.invoke(app, ["doctor", "--config", str(config), "--no-machine"]).stdout
    assert out.strip() and not [line for line in out.splitlines() if re.search(r" +$", line)]
