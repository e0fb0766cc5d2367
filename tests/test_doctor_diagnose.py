"""diagnose(): Finding, sorting, exit codes, inputs that are bad usage, and no torch on the log/config path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crepa_mem.doctor.diagnose import Diagnosis, Finding, check_gpu_argument, diagnose, read_config, sort_findings
from crepa_mem.errors import CrepaConfigError, ProfileNotFoundError

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
WAN_CONFIG = Path(__file__).parent / "fixtures" / "simpletuner" / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json"


def test_finding_dict_and_validation():
    f = Finding("oom", "error", "ran out", "do this", {"phase": "encoder", "tried_bytes": 5})
    d = f.to_dict()
    assert list(d)[:5] == ["code", "severity", "message", "fix", "phase"] and d["phase"] == "encoder"
    assert d["details"] == {"phase": "encoder", "tried_bytes": 5}
    assert "phase" not in Finding("x", "info", "m", "f").to_dict()
    with pytest.raises(ValueError, match="severity"):
        Finding("x", "fatal", "m", "f")


def test_sorting_and_exit_code():
    fs = [Finding("a", "info", "", ""), Finding("b", "error", "", ""), Finding("c", "warning", "", ""),
          Finding("d", "error", "", "")]
    assert [f.code for f in sort_findings(fs)] == ["b", "d", "c", "a"]
    assert Diagnosis(fs, {}).exit_code == 1
    assert Diagnosis([fs[0], fs[2]], {}).exit_code == 0


def test_config_and_log_together_use_the_configs_model():
    d = diagnose(config=WAN_CONFIG, log=FIXTURES / "oom_encoder_crepa_mem_rtx3090_torch21.log", machine=False)
    assert d.summary["model"] == "wan-2.1-1.3b" and d.summary["log"]["lines"] == 24
    assert d.findings[0].code == "oom" and d.exit_code == 1
    assert d.findings[0].details["plan_command"].startswith("crepa-mem plan --model wan-2.1-1.3b --gpu 23.69GiB")
    assert d.summary["errors"] == 1 and d.summary["exit_code"] == 1
    report = d.to_dict()
    assert set(report) == {"findings", "summary"}
    json.dumps(report)  # plain JSON types all the way down


def test_model_flag_and_gpu_flag_reach_the_fix():
    d = diagnose(log=FIXTURES / "oom_unknown_bare_rtx4090.log", model="ltx", gpu="rtx4090", machine=False)
    (oom,) = [f for f in d.findings if f.code == "oom"]
    assert "--model ltxvideo-2b --gpu 23.65GiB" in oom.details["plan_command"]  # the log's own capacity wins
    d = diagnose(log=["torch.OutOfMemoryError: CUDA out of memory."], model="wan", gpu="rtx4090", machine=False)
    (oom,) = [f for f in d.findings if f.code == "oom"]
    assert "--gpu rtx4090" in oom.details["plan_command"]  # no figures in the message: --gpu


def test_frames_flag_alone_runs_config_checks():
    d = diagnose(model="ltxvideo-2b", frames=50, machine=False)
    assert [f.code for f in d.findings] == ["frames_not_aligned"]


def test_nothing_to_read_without_machine_is_empty():
    d = diagnose(machine=False)
    assert d.findings == [] and d.exit_code == 0


@pytest.mark.parametrize("content, match", [(None, "existing JSON file"), ("{not json", "JSON"),
                                            ("[1, 2]", "JSON object")])
def test_bad_config_files_are_bad_input(tmp_path, content, match):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CrepaConfigError, match=match) as e:
        read_config(path)
    assert e.value.exit_code == 2


def test_cli_style_keys_are_normalised(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"--crepa-block-index": 3, "--crepa_lambda": 0.1}))
    assert read_config(path) == {"crepa_block_index": 3, "crepa_lambda": 0.1}


def test_gpu_and_model_arguments():
    assert check_gpu_argument("24GiB") == "24GiB"
    assert check_gpu_argument("RTX 4090") == "rtx4090"
    assert check_gpu_argument("auto") == "auto" and check_gpu_argument("1") == "1"
    with pytest.raises(ProfileNotFoundError, match="did you mean"):
        check_gpu_argument("rtx4091")
    with pytest.raises(ProfileNotFoundError):
        diagnose(model="wan-9000", machine=False)


def test_log_and_config_paths_import_no_torch():
    code = ("import sys; from crepa_mem.doctor.diagnose import diagnose; "
            f"d = diagnose(config={str(WAN_CONFIG)!r}, log={str(FIXTURES / 'oom_projector_sana_l40s.log')!r}, "
            "model='sanavideo', machine=False); "
            "assert d.findings[0].code == 'oom', d.findings; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_machine_check_judges_the_tiers_an_oom_plan_picks():
    pytest.importorskip("crepa_mem.planning.estimate")
    from crepa_mem.doctor.machine import MachineProbe

    def no_nvml():
        raise ImportError("pynvml")

    probe = MachineProbe(nvml=no_nvml, memlock=lambda: (8 << 20, 8 << 20),
                         meminfo=lambda: {"MemAvailable": 64 << 30}, gpu_device_nodes=lambda: False)
    d = diagnose(log=FIXTURES / "oom_vae_decode_wan_rtx4090.log", model="wan-2.1-1.3b", machine=True,
                 machine_probe=probe)
    (oom,) = [f for f in d.findings if f.code == "oom"]
    (pinned,) = [f for f in d.findings if f.code == "pinned_memory_limited"]
    planned = {oom.details["settings"].get(k) for k in ("crepa_mem_encoder_tier", "crepa_mem_vae_tier")}
    assert pinned.severity == ("warning" if planned & {"swap", "stream"} else "info")
