"""crepa_mem.planning.bench: the real teacher path with full-size random modules, next to the trace and the estimate."""
import pytest

from crepa_mem.planning.bench import bench
from crepa_mem.trace.workloads import TeacherSettings, Workload, trace_candidate

# Full-size Wan 2.1 VAE and DINOv2-S, one latent frame at 32×32: seconds on a CPU.
TINY = Workload(model="wan-2.1-1.3b", frames=1, height=32, width=32, encoder="dinov2_vits14", image_size=70,
                vae_dtype="fp32")


@pytest.mark.slow
def test_on_a_cpu_bench_times_the_runs_and_says_memory_is_not_measured():
    given = TeacherSettings(encoder_tier="stream", chunk=1)
    seen = []
    report = bench(TINY, given, device="cpu", steps=2, runs=("baseline", "given", "auto"), progress=seen.append)
    assert report["memory_measured"] is False and "times only" in report["note"]
    names = [r["name"] for r in report["runs"]]
    assert names == ["baseline", "given", "auto"] and any("step 2/2" in s for s in seen)
    base, mine, auto = report["runs"]
    for r in report["runs"]:
        assert len(r["step_seconds"]) == 2 and all(t > 0 for t in r["step_seconds"]) and r["median_step_s"] > 0
        assert r["peak_bytes"] is None and r["peak_over_trace"] is None and r["trace_peak_bytes"] > 0
    assert base["estimate_peak_bytes"] is None  # the estimate models crepa-mem's path, not SimpleTuner's
    assert mine["settings"]["encoder_tier"] == "stream" and mine["rung"].startswith("encoder=stream vae=gpu chunk=1")
    assert mine["trace_peak_bytes"] == trace_candidate(TINY, TeacherSettings(encoder_tier="stream", chunk=1)).peak_bytes
    assert auto["rung"].startswith("encoder=gpu vae=gpu") and "crepa-mem auto on cpu" in auto["note"]
    assert 0.9 < auto["estimate_peak_bytes"] / auto["trace_peak_bytes"] < 1.1


def test_given_is_skipped_when_no_settings_are_given():
    report = bench(TINY, None, device="cpu", steps=1, runs=("given",), trace=False)
    assert report["runs"] == []
