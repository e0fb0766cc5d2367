"""SimpleTuner's own CREPA tests (`tests/test_crepa.py` of its repository) run against the drop-in.

The file is read at run time from a SimpleTuner checkout — `$CREPA_MEM_SIMPLETUNER_REPO`, or the mirror
the project's sessions fetch — and executed in a pytest subprocess whose conftest patches SimpleTuner
first, so every `CrepaRegularizer` those tests build is crepa-mem's. Tests that call SimpleTuner's
private helpers (`_project_hidden_states`, `_encode_frames`, …) need not pass; every other one must.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MIRROR = Path("/work/.mirror/bghira+SimpleTuner/repo")


def _simpletuners_test_file() -> str:
    repo = os.environ.get("CREPA_MEM_SIMPLETUNER_REPO")
    if repo and (Path(repo) / "tests" / "test_crepa.py").is_file():
        return (Path(repo) / "tests" / "test_crepa.py").read_text()
    if MIRROR.is_dir():
        run = subprocess.run(["git", "-C", str(MIRROR), "show", "HEAD:tests/test_crepa.py"],
                             capture_output=True, text=True)
        if run.returncode == 0:
            return run.stdout
    pytest.skip("no SimpleTuner checkout here: set CREPA_MEM_SIMPLETUNER_REPO to a clone of bghira/SimpleTuner")


def _run(tmp_path: Path, patched: bool) -> dict[str, str]:
    """{test id: "" if it passed, else its failure message} for SimpleTuner's test_crepa.py."""
    work = tmp_path / ("patched" if patched else "unpatched")
    work.mkdir()  # patched=False runs them against SimpleTuner's own class (to compare by hand)
    (work / "test_crepa.py").write_text(_simpletuners_test_file())  # executed from tmp, never kept
    (work / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import simpletuner_real
        simpletuner_real.simpletuner()
        if {patched!r}:
            import crepa_mem.integrations.simpletuner as drop_in
            drop_in.patch_simpletuner()
    """))
    report = work / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                    f"--junitxml={report}", "test_crepa.py"], cwd=work, capture_output=True, text=True, timeout=900)
    if not report.exists():
        pytest.fail("SimpleTuner's test_crepa.py did not run")
    out = {}
    for case in ET.parse(report).iter("testcase"):
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        out[f"{case.get('classname')}::{case.get('name')}"] = "" if failure is None else failure.get("message", "?")
    return out


def test_simpletuners_own_crepa_tests_pass_against_the_drop_in(tmp_path):
    import simpletuner_real

    simpletuner_real.unpacked()  # skips, with the reason, where the wheel cannot be fetched
    ours = _run(tmp_path, patched=True)
    failed = {t: msg for t, msg in ours.items() if msg}
    private = {t for t, msg in failed.items() if "AttributeError" in msg and "attribute '_" in msg}
    assert {t: msg for t, msg in failed.items() if t not in private} == {}  # all but private-helper tests pass
    assert len(ours) - len(failed) > 10 * len(private)
