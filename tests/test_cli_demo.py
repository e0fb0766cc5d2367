import json

import pytest
from typer.testing import CliRunner

from crepa_mem.cli.app import app


@pytest.mark.parametrize("family", ["wan", "ltxvideo"])
def test_demo_runs_crepa_end_to_end_and_prints_logs(family):
    result = CliRunner().invoke(app, ["demo", "--family", family, "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["steps"]
    assert len(rows) == 2
    for row in rows:
        assert row["crepa_loss"] < 0 and row["crepa_weight"] == 0.5
        assert row["crepa_teacher_frames_encoded"] == 3  # 3 DiT frames kept out of 9 / 17 pixel frames
    assert rows[1]["crepa_alignment_score"] > rows[0]["crepa_alignment_score"]  # one AdamW step helps


def test_demo_human_table():
    result = CliRunner().invoke(app, ["demo", "--steps", "1"])
    assert result.exit_code == 0 and "CREPA on a tiny random wan transformer" in result.stdout


def test_demo_unknown_family_is_one_line_exit_2():
    result = CliRunner().invoke(app, ["demo", "--family", "flux"])
    assert result.exit_code == 2
    assert "flux" in result.stderr and "Traceback" not in result.output
