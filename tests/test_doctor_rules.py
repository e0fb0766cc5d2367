"""Line rules: PyTorch's OOM wordings to bytes, CREPA/NVML/driver errors to events, frames to phases."""
from __future__ import annotations

import pytest

from crepa_mem.doctor.rules import (TRIGGERS, detect_events, has_trigger, is_wrapper_error, looks_like_exception,
                                    oom_complete, oom_numbers)
from crepa_mem.units import GiB, MiB

NEW = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.45 GiB. GPU 0 has a total capacity of "
       "23.53 GiB of which 1.12 GiB is free. Including non-PyTorch memory, this process has 22.40 GiB memory in use. "
       "Of the allocated memory 20.85 GiB is allocated by PyTorch, and 1.09 GiB is reserved by PyTorch but "
       "unallocated. If reserved but unallocated memory is large try setting "
       "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
OLD = ("RuntimeError: CUDA out of memory. Tried to allocate 7.03 GiB (GPU 0; 39.39 GiB total capacity; 27.91 GiB "
       "already allocated; 5.87 GiB free; 32.96 GiB reserved in total by PyTorch) If reserved memory is >> allocated "
       "memory try setting max_split_size_mb to avoid fragmentation.")
OLD_ALLOWED = ("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 14.76 GiB total capacity; 12.63 GiB already "
               "allocated; 5.75 MiB free; 13.43 GiB allowed; 13.73 GiB reserved in total by PyTorch)")
TORCH21 = ("torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.17 GiB. GPU 0 has a total capacty "
           "of 23.69 GiB of which 412.56 MiB is free.")
PRIVATE = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB. GPU 1 has a total capacity of "
           "79.19 GiB of which 100.00 MiB is free. Process 7 has 10.00 GiB memory in use. Process 8 has 2.00 GiB "
           "memory in use. 70.00 GiB allowed; Of the allocated memory 60.00 GiB is allocated by PyTorch, with 4.00 "
           "GiB allocated in private pools (e.g., CUDA Graphs), and 5.00 GiB is reserved by PyTorch but unallocated.")
MPS = ("RuntimeError: MPS backend out of memory (MPS allocated: 17.88 GB, other allocations: 382.59 MB, max allowed: "
       "18.13 GB). Tried to allocate 256 bytes on private pool.")


def test_new_wording():
    d = oom_numbers(NEW)
    assert d == {"wording": "new", "tried_bytes": int(1.45 * GiB), "gpu_index": 0, "total_bytes": int(23.53 * GiB),
                 "free_bytes": int(1.12 * GiB), "allocated_bytes": int(20.85 * GiB),
                 "reserved_unallocated_bytes": int(1.09 * GiB), "process_bytes": int(22.40 * GiB)}
    assert oom_complete(NEW)


@pytest.mark.parametrize("text, allocated, reserved", [(OLD, 27.91, 32.96), (OLD_ALLOWED, 12.63, 13.73)])
def test_old_wording_derives_unallocated_from_reserved(text, allocated, reserved):
    d = oom_numbers(text)
    assert d["wording"] == "old" and d["allocated_bytes"] == int(allocated * GiB)
    assert d["reserved_unallocated_bytes"] == int(reserved * GiB) - int(allocated * GiB)


def test_torch21_typo_and_incomplete_message():
    d = oom_numbers(TORCH21)
    assert d["wording"] == "new" and d["total_bytes"] == int(23.69 * GiB) and d["free_bytes"] == int(412.56 * MiB)
    assert not oom_complete(TORCH21)  # the rest may follow on the next lines of a pasted log


def test_private_pools_allowed_and_other_processes():
    d = oom_numbers(PRIVATE)
    assert d["gpu_index"] == 1 and d["allocated_bytes"] == 60 * GiB and d["reserved_unallocated_bytes"] == 5 * GiB
    assert d["processes"] == [{"pid": 7, "used_bytes": 10 * GiB}, {"pid": 8, "used_bytes": 2 * GiB}]
    assert "process_bytes" not in d


def test_mps_and_bare_wordings():
    d = oom_numbers(MPS)
    assert d["wording"] == "mps" and d["total_bytes"] == int(18.13 * GiB) and d["tried_bytes"] == 256
    (e,) = detect_events("RuntimeError: CUDA error: out of memory")
    assert e.code == "oom" and e.data["wording"] == "bare" and e.data["phase"] == "unknown"
    (e,) = detect_events("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert e.code == "oom"


@pytest.mark.parametrize("line, total, free", [
    ("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 8.00 GiB "
     "of which 0 bytes is free. Of the allocated memory 14.51 GiB is allocated by PyTorch, and 15.90 MiB is reserved "
     "by PyTorch but unallocated.", 8 * GiB, 0),
    ("torch.OutOfMemoryError: XPU out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total capacity of 48.00 GiB "
     "of which 896.00 KiB is free. Of the allocated memory 40.00 GiB is allocated by PyTorch, and 2.00 GiB is reserved "
     "by PyTorch but unallocated. Please use `empty_cache` to release all unoccupied cached memory.",
     48 * GiB, 896 * 1024),
])
def test_other_wordings(line, total, free):
    (event,) = detect_events(line)
    assert (event.data["total_bytes"], event.data["free_bytes"]) == (total, free)


def test_crepa_mem_teacher_oom_defaults_to_the_encoder():
    (e,) = detect_events("crepa_mem.errors.TeacherOutOfMemoryError: the teacher ran out of memory at 1 frame per chunk")
    assert e.data["wording"] == "crepa_mem" and e.data["phase"] == "encoder"


@pytest.mark.parametrize("line, code, data", [
    ("ValueError: CREPA requested hidden states from layer 40 but none were returned. Check that crepa_block_index "
     "is within the model's block count.", "block_index_out_of_range", {"block_index": 40}),
    ("Error: hidden states not returned", "block_index_out_of_range", {"block_index": None}),
    ("crepa_mem.errors.CaptureError: hidden states not returned: ltxvideo transformer has 28 blocks, valid block "
     "indices are 0..27, got 28.", "block_index_out_of_range", {"block_index": 28, "num_blocks": 28,
                                                                 "family": "ltxvideo"}),
    ("ValueError: CREPA is enabled but no intermediate hidden states were provided.", "block_index_out_of_range",
     {"block_index": None}),
    ("crepa_mem.errors.CaptureError: CREPA cannot capture hidden states from FluxTransformer2DModel: supported "
     "families are wan, ltxvideo", "unsupported_family", {"name": "FluxTransformer2DModel"}),
    ("ValueError: crepa_block_index must be set when CREPA is enabled.", "invalid_option",
     {"key": "crepa_block_index", "value": None}),
    ("ValueError: crepa_adjacent_tau must be greater than zero.", "invalid_option", {"key": "crepa_adjacent_tau"}),
    ("crepa_mem.errors.CrepaConfigError: crepa_lambda=-1.0 is invalid: valid is a number ≥ 0", "invalid_option",
     {"key": "crepa_lambda", "value": "-1.0", "valid": "a number ≥ 0"}),
    ("ValueError: CREPA enabled but unable to infer transformer hidden size.", "hidden_size_unknown", {}),
    ("RuntimeError: Expected all tensors to be on the same device, but got mat1 is on cuda:0, different from other "
     "tensors on cpu (when checking argument in method wrapper_CUDA_addmm)", "device_mismatch",
     {"devices": ["cpu", "cuda:0"]}),
    ("NotImplementedError: Cannot copy out of meta tensor; no data!", "device_mismatch", {"devices": ["meta"]}),
    ("pynvml.NVMLError_LibraryNotFound: NVML Shared Library Not Found", "nvml_unavailable", {}),
    ("Failed to initialize NVML: Driver/library version mismatch", "driver_library_mismatch", {}),
    ("pynvml.NVMLError_LibRmVersionMismatch: RM has detected an NVML/RM version mismatch.",
     "driver_library_mismatch", {}),
    ("Failed to initialize NVML: Unknown Error", "nvml_unknown_error", {}),
    ("nvidia-container-cli: detection error: nvml error: unknown error: unknown.", "nvml_unknown_error", {}),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA "
     "driver is installed and running.", "nvidia_smi_failed", {}),
    ("nvidia-container-cli: initialization error: nvml error: driver not loaded: unknown.", "driver_not_loaded", {}),
    ("nvidia-container-cli: initialization error: load library failed: libnvidia-ml.so.1: cannot open shared object "
     "file: no such file or directory: unknown.", "nvml_unavailable", {}),
    ("RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed "
     "a driver", "driver_not_loaded", {}),
    ("RuntimeError: The NVIDIA driver on your system is too old (found version 11040).", "driver_too_old", {}),
    ("AssertionError: Torch not compiled with CUDA enabled", "torch_without_cuda", {}),
    ("RuntimeError: Cannot find callable dinov2_vitx14 in hubconf", "unknown_encoder", {"name": "dinov2_vitx14"}),
    ("RuntimeError: Cannot find callable dinov2_vits14_reg in hubconf", "encoder_hub_error",
     {"kind": "stale_cache", "name": "dinov2_vits14_reg"}),  # a valid name: the hub cache is older than it
    ("FileNotFoundError: [Errno 2] No such file or directory: '/models/dinov2/hubconf.py'", "encoder_hub_error",
     {"kind": "missing_hubconf", "path": "/models/dinov2/hubconf.py"}),
    ("crepa_mem.errors.EncoderNotAvailableError: facebook/dinov2-giant is not in the cache and the hub is offline",
     "encoder_weights_missing", {}),
    ("OSError: We couldn't connect to 'https://huggingface.co' to load this file, couldn't find it in the cached "
     "files and it looks like facebook/dinov2-giant is not the path to a directory", "encoder_weights_missing",
     {"repo": "facebook/dinov2-giant"}),
])
def test_rules(line, code, data):
    events = detect_events(line)
    assert [e.code for e in events] == [code]
    for key, value in data.items():
        assert events[0].data[key] == value
    assert has_trigger(line.lower()) and has_trigger(line.lower().encode())


def test_network_error_is_the_encoders_only_inside_its_traceback():
    frames = (("/st/helpers/training/crepa.py", "_load_encoder", "self.encoder = torch.hub.load(...)"),
              ("/x/torch/hub.py", "load", ""))
    line = "urllib.error.URLError: <urlopen error [Errno -3] Temporary failure in name resolution>"
    assert [e.code for e in detect_events(line, frames, exception_line=True)] == ["encoder_weights_missing"]
    assert detect_events(line, (("/x/requests/api.py", "get", ""),), exception_line=True) == []
    assert detect_events(line) == []


def test_plain_lines_and_launcher_errors():
    assert detect_events("Epoch 1/5, Steps: 3%| 6/200 [00:41<21:55, step_loss=0.0931]") == []
    assert not has_trigger(b"epoch 1/5, steps: 3%")
    assert is_wrapper_error("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:")
    assert all(word == word.lower() for word in TRIGGERS)


@pytest.mark.parametrize("line, wording, numbers", [
    ("torch.OutOfMemoryError: HIP out of memory. Tried to allocate 8.44 GiB. GPU 0 has a total capacity of 191.98 GiB "
     "of which 3.12 GiB is free. Of the allocated memory 181.44 GiB is allocated by PyTorch, and 6.71 GiB is reserved "
     "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
     "PYTORCH_HIP_ALLOC_CONF=expandable_segments:True to avoid fragmentation.", "new",
     {"total_bytes": int(191.98 * GiB), "reserved_unallocated_bytes": int(6.71 * GiB)}),
    ("torch.AcceleratorError: CUDA error: out of memory", "bare", {}),
    ("torch.OutOfMemoryError: Allocation on device ", "bare", {}),  # ComfyUI prints no more than this
    ("torch.OutOfMemoryError: Allocation on device 0 would exceed allowed memory. (out of memory) Currently allocated"
     "     : 15.16 GiB Requested               : 1.27 GiB Device limit            : 15.99 GiB Free (according to "
     "CUDA): 0 bytes", "async", {"gpu_index": 0, "allocated_bytes": int(15.16 * GiB), "tried_bytes": int(1.27 * GiB),
                                 "total_bytes": int(15.99 * GiB), "free_bytes": 0}),
    ("RuntimeError: CUDA out of memory. Tried to allocate 1.12 MiB (GPU 0; 22.37 GiB total capacity; 15.87 GiB already "
     "allocated; 3.56 MiB free; 787.74 MiB cached)", "old", {"reserved_unallocated_bytes": int(787.74 * MiB)}),
])
def test_rocm_accelerator_async_and_oldest_wordings(line, wording, numbers):
    (event,) = detect_events(line)
    assert event.code == "oom" and event.data["wording"] == wording and oom_complete(line)
    for key, value in numbers.items():
        assert event.data[key] == value


def test_pinned_host_allocations_are_told_apart_from_gpu_memory():
    pin = (("/venv/torch/utils/data/_utils/pin_memory.py", "pin_memory", "return data.pin_memory(device)"),)
    (e,) = detect_events("RuntimeError: CUDA error: out of memory", pin, exception_line=True)
    assert e.data["memory"] == "pinned_host"
    swap = (("/dp/utils/offloading.py", "prepare_block_devices_before_forward",
             "weights_to_device(b, torch.device('cpu'))"),
            ("/dp/utils/offloading.py", "weights_to_device", "w.data = w.data.to(device, non_blocking=True)"))
    (e,) = detect_events("torch.AcceleratorError: CUDA error: out of memory", swap, exception_line=True)
    assert e.data["memory"] == "pinned_host"
    (e,) = detect_events("RuntimeError: cudaHostAlloc failed: pinned memory could not be allocated (out of memory)")
    assert e.data["memory"] == "pinned_host"
    # the caching allocator's full message is a device allocation, even inside a non-blocking copy
    full = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "23.53 GiB of which 1.00 GiB is free. Of the allocated memory 20.00 GiB is allocated by PyTorch, and "
            "100.00 MiB is reserved by PyTorch but unallocated.")
    (e,) = detect_events(full, swap, exception_line=True)
    assert "memory" not in e.data
    dit = (("/wan/modules/model.py", "forward", "y = self.norm1(x)"),)
    (e,) = detect_events("torch.AcceleratorError: CUDA error: out of memory", dit, exception_line=True)
    assert "memory" not in e.data and e.data["phase"] == "transformer"


def test_names_never_come_from_quoted_source_lines():
    assert detect_events('    raise RuntimeError(f"Cannot find callable {model} in hubconf")') == []
    assert detect_events("raise RuntimeError('Cannot find callable {} in hubconf'.format(model))") == []
    assert detect_events("- **Exception Type:** torch.OutOfMemoryError") == []  # a type without its message


def test_errors_inside_torch_hub_are_not_a_bad_name():
    hub = (("/st/helpers/training/crepa.py", "_load_encoder", "self.encoder = torch.hub.load(...)"),
           ("/x/torch/hub.py", "_get_cache_or_reload", ""), ("/usr/lib/python3.11/urllib/request.py", "open", ""))
    (e,) = detect_events("urllib.error.HTTPError: HTTP Error 403: rate limit exceeded", hub, exception_line=True)
    assert (e.code, e.data["kind"]) == ("encoder_hub_error", "rate_limit")
    conf = (("/x/torch/hub.py", "_load_local", ""),
            ("/root/.cache/torch/hub/facebookresearch_dinov2_main/hubconf.py", "<module>", ""))
    (e,) = detect_events("ImportError: cannot import name 'Attention' from 'dinov2.layers'", conf, exception_line=True)
    assert (e.code, e.data["kind"]) == ("encoder_hub_error", "hubconf_failed")
    assert [e.code for e in detect_events("urllib.error.URLError: <urlopen error [Errno -3] Temporary failure in name "
                                          "resolution>", hub, exception_line=True)] == ["encoder_weights_missing"]


@pytest.mark.parametrize("line, exception", [
    ("KeyError: 'aspect'", True), ("torch.OutOfMemoryError: CUDA out of memory.", True),
    ("pynvml.NVMLError_LibraryNotFound: NVML Shared Library Not Found", True), ("RuntimeError", True),
    ("process = script(arguments)", False), ("return F.conv3d(", False), ("loss = self.model.loss(", False),
    ("except torch.OutOfMemoryError:", False),
])
def test_exception_lines_and_source_lines(line, exception):
    assert looks_like_exception(line) is exception
