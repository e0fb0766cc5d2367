"""`crepa-mem bench`: bad input is one line and exit 2; --json prints the report."""
import json

import pytest
from typer.testing import CliRunner

from crepa_mem.cli.app import app

TINY = ["--model", "wan-2.1-1.3b", "--frames", "1", "--height", "32", "--width", "32", "--encoder", "dinov2_vits14",
        "--image-size", "70", "--vae-dtype", "fp32"]


@pytest.mark.parametrize("args, says", [
    (["--encoder-tier", "cache"], "--encoder-tier 'cache' is invalid"),
    (["--runs", "baseline,fast"], "--runs 'baseline,fast' is invalid"),
    (["--steps", "0"], "--steps 0 is invalid"),
    (["--image-size", "100"], "--image-size 100 is invalid"),
    (["--frames", "4"], "4 is invalid"),
    (["--device", "cuda:0"], "no CUDA device"),
])
def test_bad_input_is_one_line_and_exit_2(args, says):
    result = CliRunner().invoke(app, ["bench", *TINY, *args])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output


def test_json_report_of_the_auto_run():
    result = CliRunner().invoke(app, ["bench", *TINY, "--runs", "auto", "--steps", "1", "--no-trace", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"device", "device_name", "memory_measured", "note", "workload", "steps", "runs"}
    (run,) = report["runs"]
    assert run["name"] == "auto" and run["trace_peak_bytes"] is None and run["estimate_peak_bytes"] > 0
    assert report["workload"]["latent_frames"] == 1 and run["rung"].startswith("encoder=gpu")
