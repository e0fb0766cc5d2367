"""Log parsing: the fixture corpus, PyTorch's OOM wordings, phase attribution, streaming and bad input."""
from __future__ import annotations

import io
import json
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from crepa_mem.doctor.diagnose import Context
from crepa_mem.doctor.logs import MAX_LINE_BYTES, findings_from_scan, iter_log_lines, scan_log
from crepa_mem.profiles import get_model
from crepa_mem.units import GiB, MiB

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["logs"]
PROGRESS = ("2025-11-02 14:03:11,201 [INFO] (helpers.training.trainer) Epoch 1/5, Steps:   3%|▎ | 6/200 "
            "[00:41<21:55, 6.78s/it, lr=6e-5, step_loss=0.0931]\n")


def _findings(source, model=None):
    ctx = Context(model=get_model(model) if model else None)
    return findings_from_scan(scan_log(source), ctx)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_codes_severities_and_phase(name):
    want = EXPECTED[name]
    findings = _findings(FIXTURES / name)
    got = {}
    for f in findings:
        got.setdefault(f.code, set()).add(f.severity)
    assert got == {code: {sev} for code, sev in want["codes"].items()}, name
    assert not set(want.get("not", ())) & set(got), name  # a wrong diagnosis here would mislead
    ooms = [f for f in findings if f.code == "oom"]
    if "phase" in want:
        assert [f.details["phase"] for f in ooms] == [want["phase"]]
        assert ooms[0].to_dict()["phase"] == want["phase"]
    else:
        assert not ooms


@pytest.mark.parametrize("name", sorted(n for n, w in EXPECTED.items() if "gpu" in w))
def test_oom_fix_names_the_plan_for_that_gpu(name):
    (oom,) = [f for f in _findings(FIXTURES / name, model="wan-2.1-14b") if f.code == "oom"]
    cmd = oom.details["plan_command"]
    assert cmd.startswith("crepa-mem plan --model wan-2.1-14b --gpu ")
    assert cmd.split("--gpu ")[1].split()[0] == EXPECTED[name]["gpu"]
    assert cmd in oom.fix
    assert "--frames 81 --height 480 --width 832" in cmd  # the checkpoint's training shape


def test_new_wording_numbers_are_parsed_exactly():
    scan = scan_log(FIXTURES / "oom_vae_decode_wan_rtx4090.log")
    (event,) = scan.events.values()
    d = event.data
    assert d["wording"] == "new" and d["gpu_index"] == 0
    assert d["tried_bytes"] == int(1.45 * GiB)
    assert d["total_bytes"] == int(23.53 * GiB)
    assert d["free_bytes"] == int(1.12 * GiB)
    assert d["allocated_bytes"] == int(20.85 * GiB)
    assert d["reserved_unallocated_bytes"] == int(1.09 * GiB)
    assert d["process_bytes"] == int(22.40 * GiB)
    assert event.line_no == 45
    assert d["where"] == "autoencoder_kl_wan.py:forward"


def test_fragmentation_needs_much_unallocated_memory():
    small = [f.code for f in _findings(FIXTURES / "oom_projector_sana_l40s.log")]  # 578 MiB of 44 GiB
    assert "fragmentation" not in small
    big = [f for f in _findings(FIXTURES / "oom_fragmentation_ltx_a6000.log") if f.code == "fragmentation"]
    assert big[0].details["alloc_conf"] == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    assert big[0].details["reserved_unallocated_bytes"] == int(7.12 * GiB)


def test_bare_message_then_traceback_keeps_one_event_with_the_phase():
    msg = open(FIXTURES / "oom_vae_decode_wan_rtx4090.log").read().splitlines()
    oom_line = next(line for line in msg if "OutOfMemoryError" in line)
    lines = ["[ERROR] step failed: " + oom_line.split(": ", 1)[1], *msg]
    oom = [f for f in _findings(lines) if f.code == "oom"]
    assert len(oom) == 1 and oom[0].details["phase"] == "vae_decode" and oom[0].details["count"] == 2


def test_repeated_failures_are_counted_not_stored():
    text = (FIXTURES / "block_index_wan.log").read_text() * 500
    scan = scan_log(text.splitlines())
    assert len(scan.events) == 1
    assert next(iter(scan.events.values())).count == 500


def test_rank_prefix_and_launcher_error_are_not_unrecognized():
    codes = [f.code for f in _findings(FIXTURES / "oom_encoder_torchhub_h100.log")]
    assert codes == ["oom"]


def test_unrelated_traceback_is_info_with_the_exception():
    (f,) = _findings(FIXTURES / "unrelated_traceback.log")
    assert f.severity == "info" and "KeyError: 'aspect'" in f.message and f.details["count"] == 1


def _peak_scan(n_lines: int, tail: list[str]):
    def lines():
        for _ in range(n_lines):
            yield PROGRESS
        yield from tail

    tracemalloc.start()
    try:
        scan = scan_log(lines())
        return scan, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_generator_of_200k_lines_is_streamed():
    """A generator is consumed block by block: the peak does not grow with the log (200k lines weigh
    26 MB) and stays a few MiB."""
    oom = (FIXTURES / "oom_vae_decode_wan_rtx4090.log").read_text().splitlines(True)
    small_scan, small_peak = _peak_scan(20_000, oom)
    scan, peak = _peak_scan(200_000, oom)
    assert scan.lines == 200_000 + len(oom) and small_scan.lines == 20_000 + len(oom)
    (event,) = scan.events.values()
    assert event.line_no == 200_000 + 45 and event.data["phase"] == "vae_decode"
    assert peak < 1.5 * small_peak + 1 * MiB, f"peak {peak / MiB:.1f} MiB vs {small_peak / MiB:.1f} MiB for 20k lines"
    assert peak < 12 * MiB


def test_50mb_log_file_bounded_memory_and_time(tmp_path):
    path = tmp_path / "train.log"
    block = PROGRESS * 4096
    with path.open("w") as f:
        while f.tell() < 50 * 10**6:
            f.write(block)
        f.write((FIXTURES / "oom_transformer_backward_wan14b_h100.log").read_text())
    size = path.stat().st_size
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        scan = scan_log(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - t0
    print(f"50 MB log: {size} bytes in {seconds:.2f} s, peak {peak / MiB:.1f} MiB traced")
    assert scan.bytes == size
    assert [e.data["phase"] for e in scan.events.values()] == ["transformer"]
    assert peak < 16 * MiB
    assert seconds < 20


def test_binary_without_newlines_is_cut_and_flagged(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)).replace(b"\n", b"") * 12_000)  # ~3 MB, no newline at all
    scan = scan_log(path)
    assert scan.binary and scan.lines >= 1
    assert max(len(line) for line in iter_log_lines(path)) <= MAX_LINE_BYTES + 1
    assert [f.code for f in findings_from_scan(scan, Context())] == ["log_not_text"]


def test_invalid_utf8_in_a_text_log_is_replaced(tmp_path):
    path = tmp_path / "latin1.log"
    body = (FIXTURES / "device_mismatch_ramtorch.log").read_bytes()
    path.write_bytes(b"caf\xe9 \xff\xfe progress\n" + body)
    codes = [f.code for f in _findings(path)]
    assert codes == ["device_mismatch"]


def test_over_long_lines_from_an_iterable_are_cut():
    lines = list(iter_log_lines(["x" * (3 * MAX_LINE_BYTES) + "\n", "short\n"]))
    assert lines[-1] == "short" and all(len(line) <= MAX_LINE_BYTES for line in lines)


def test_crlf_and_bytes_lines():
    raw = (FIXTURES / "hidden_size_unknown.log").read_bytes().replace(b"\n", b"\r\n")
    assert [f.code for f in _findings(raw.splitlines(True))] == ["hidden_size_unknown"]


def test_stdin_dash(monkeypatch):
    data = (FIXTURES / "block_index_sanavideo.log").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    scan = scan_log("-")
    assert scan.source == "<stdin>" and [e.code for e in scan.events.values()] == ["block_index_out_of_range"]


def test_text_stream():
    stream = io.StringIO((FIXTURES / "torch_without_cuda.log").read_text())
    assert [f.code for f in _findings(stream)] == ["torch_without_cuda"]


def test_block_index_fix_uses_the_model_or_the_family():
    (f,) = _findings(FIXTURES / "block_index_sanavideo.log")  # family from SimpleTuner's model file path
    assert f.details["valid_range"] == [0, 19] and '"crepa_block_index": 10' in f.fix
    (f,) = _findings(FIXTURES / "block_index_wan.log", model="wan-2.1-14b")
    assert f.details["valid_range"] == [0, 39] and '"crepa_block_index": 8' in f.fix
    (f,) = _findings(FIXTURES / "block_index_crepa_mem_capture.log")  # the error states the block count
    assert f.details["valid_range"] == [0, 29]


def test_block_index_inside_range_points_at_the_hook_not_the_index():
    line = "ValueError: CREPA requested hidden states from layer 12 but none were returned."
    (f,) = _findings([line], model="wan-2.1-14b")
    assert "not the cause" in f.message


def test_missing_log_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_log(tmp_path / "nope.log")
    with pytest.raises(IsADirectoryError):
        scan_log(tmp_path)


def test_wrapped_message_is_joined_and_the_run_itself_is_not_another_process():
    findings = _findings(FIXTURES / "oom_wrapped_paste_h200.log")
    (oom,) = [f for f in findings if f.code == "oom"]
    assert oom.details["allocated_bytes"] == int(126.08 * GiB)
    assert oom.details["reserved_unallocated_bytes"] == int(5.56 * GiB)
    assert oom.details["line"] == 10 and oom.details["phase"] == "encoder"
    (held,) = [f for f in findings if f.code == "gpu_memory_held_by_other_process"]
    assert [p["pid"] for p in held.details["processes"]] == [2109]  # 1448259 holds ≥ what PyTorch allocated


def test_wrapped_message_stops_at_the_next_failure():
    lines = ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
             "ValueError: CREPA requested hidden states from layer 40 but none were returned.",
             "GPU 0 has a total capacity of 23.53 GiB of which 1.00 GiB is free."]
    scan = scan_log(lines)
    assert sorted(e.code for e in scan.events.values()) == ["block_index_out_of_range", "oom"]
    (oom,) = [e for e in scan.events.values() if e.code == "oom"]
    assert "total_bytes" not in oom.data


def test_old_wording_fixture_suggests_max_split_size():
    frag = [f for f in _findings(FIXTURES / "oom_vae_decode_ltx_a100_torch20.log") if f.code == "fragmentation"]
    assert "max_split_size_mb" in frag[0].fix  # PyTorch <= 2.0 has no expandable segments


def test_private_pool_message_gives_three_findings():
    line = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB. GPU 1 has a total capacity of "
            "79.19 GiB of which 100.00 MiB is free. Process 7 has 10.00 GiB memory in use. Including non-PyTorch "
            "memory, this process has 66.00 GiB memory in use. Of the allocated memory 60.00 GiB is allocated by "
            "PyTorch, with 4.00 GiB allocated in private pools (e.g., CUDA Graphs), and 5.00 GiB is reserved by "
            "PyTorch but unallocated.")
    assert {f.code for f in _findings([line])} == {"oom", "fragmentation", "gpu_memory_held_by_other_process"}


def test_rocm_fragmentation_names_the_hip_setting():
    (frag,) = [f for f in _findings(FIXTURES / "oom_rocm_hip_mi300x_wan.log") if f.code == "fragmentation"]
    assert frag.details["alloc_conf"] == "PYTORCH_HIP_ALLOC_CONF=expandable_segments:True"


def test_headerless_frames_are_tied_to_the_error_before_or_after_them():
    (oom,) = _findings(FIXTURES / "oom_comfyui_report_headerless_wan_vae.log")
    assert oom.details["frames"][-1] == "conv.py:_conv_forward" and oom.details["count"] == 1
    msg = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB."
    frames = ['  File "/x/diffusers/models/autoencoders/autoencoder_kl_wan.py", line 1139, in _decode',
              "    out_ = self.decoder(x)", "```"]
    before = [f for f in _findings([msg, "trace:", *frames]) if f.code == "oom"]
    after = [f for f in _findings([*frames, "and the error was:", msg]) if f.code == "oom"]
    assert [f.details["phase"] for f in before + after] == ["vae_decode", "vae_decode"]
    far = [f for f in _findings([msg] + ["step"] * 100 + frames) if f.code == "oom"]
    assert far[0].details["phase"] == "unknown"  # frames 100 lines later belong to something else


def test_cudamallocasync_message_numbers_and_phase():
    (oom,) = _findings(FIXTURES / "oom_comfyui_ksampler_wan_async.log")
    d = oom.details
    assert (d["wording"], d["tried_bytes"], d["total_bytes"], d["free_bytes"]) == (
        "async", int(1.27 * GiB), int(15.99 * GiB), 0)
    assert d["where"] == "model.py:forward"


def test_pinned_host_oom_is_not_gpu_memory_and_says_so():
    (f,) = _findings(FIXTURES / "pinned_block_swap_wsl_diffusion_pipe.log")
    assert f.code == "pinned_memory_limited" and "host memory, not GPU memory" in f.message
    assert "WSL2" in f.message and "ulimit -l" in f.fix and "pin_memory=False" in f.fix
    (f,) = _findings(FIXTURES / "pinned_ramtorch_pin_memory.log")
    assert "WSL2" not in f.message and f.details["frames"][-1] == "linear.py:__init__"


def test_device_mismatch_without_offload_in_the_log_is_a_trainer_bug():
    (f,) = _findings(FIXTURES / "device_mismatch_trainer_bug.log")
    assert "Update the trainer" in f.fix
    assert "ramtorch" not in f.fix.lower() and "offload" not in f.fix.lower()
    (f,) = _findings(FIXTURES / "device_mismatch_ramtorch.log")  # the log shows RamTorch: its advice stays
    assert "ramtorch_target_modules" in f.fix


def test_hub_findings_name_their_fix():
    (stale,) = _findings(FIXTURES / "hub_stale_cache_dinov2_reg.log")
    assert "force_reload=True" in stale.fix and "dinov2_vitg14_reg" in stale.message
    (cut,) = _findings(FIXTURES / "hub_cut_paste_rank_prefix.log")
    assert cut.details["name"] == "dinov2_vitl14"  # never `{model}` from the quoted source line
    (typo,) = _findings(FIXTURES / "unknown_encoder_hub_typo.log")
    assert "dinov2_vitl16" in typo.message and "dinov2_vitl16" not in typo.fix and "dinov2_vitl14_reg" in typo.fix
    (limit,) = _findings(FIXTURES / "hub_rate_limit_403.log")
    assert "trust_repo=True" in limit.fix


def test_unindented_source_lines_keep_the_traceback():
    (oom,) = _findings(FIXTURES / "oom_unindented_source_lines_paste.log")
    assert oom.details["frames"][-2:] == ["autoencoder_kl_wan.py:_decode", "conv.py:_conv_forward"]


def test_stray_frames_all_through_a_long_log_keep_memory_flat():
    """Frames without a header every 500 lines (a logger printing stacks) are held only until the next
    line that is not theirs: the peak stays a few MiB and the OOM at the end keeps its own traceback."""
    stray = ['  File "/x/app/worker.py", line 12, in poll\n', "    item = queue.get()\n", "```\n"]
    oom = (FIXTURES / "oom_vae_decode_wan_rtx4090.log").read_text().splitlines(True)

    def lines():
        for i in range(20_000):
            yield PROGRESS
            if i % 500 == 0:
                yield from stray
        yield from oom

    tracemalloc.start()
    try:
        scan = scan_log(lines())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (event,) = scan.events.values()
    assert event.data["phase"] == "vae_decode" and event.frames[-1] == "conv.py:_conv_forward"
    assert peak < 12 * MiB
