"""Line rules: PyTorch's OOM wordings to bytes, CREPA/NVML/driver errors to events, frames to phases."""
from __future__ import annotations

import pytest

from crepa_mem.doctor.rules import (TRIGGERS, classify_phase, detect_events, has_trigger, is_wrapper_error,
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
    ("Failed to initialize NVML: Driver/library version mismatch", "driver_not_loaded", {}),
    ("RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed "
     "a driver", "driver_not_loaded", {}),
    ("RuntimeError: The NVIDIA driver on your system is too old (found version 11040).", "driver_too_old", {}),
    ("AssertionError: Torch not compiled with CUDA enabled", "torch_without_cuda", {}),
    ("RuntimeError: Cannot find callable dinov2_vitx14 in hubconf", "unknown_encoder", {"name": "dinov2_vitx14"}),
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


def test_phase_rules_on_frames():
    backward = [("/x/accelerate/accelerator.py", "backward", "loss.backward(**kwargs)"),
                ("/x/torch/autograd/graph.py", "_engine_run_backward",
                 "return Variable._execution_engine.run_backward(")]
    assert classify_phase(backward) == ("transformer", "backward")
    vae_encode = [("/st/helpers/caching/vae.py", "encode_images", "latents = self.vae.encode(pixels)"),
                  ("/x/diffusers/models/autoencoders/autoencoder_kl_wan.py", "encode", "out = self.encoder(x)"),
                  ("/x/torch/nn/modules/conv.py", "_conv_forward", "return F.conv3d(")]
    assert classify_phase(vae_encode) == ("unknown", "vae_encode")
    t5 = [("/x/transformers/models/t5/modeling_t5.py", "forward", "encoder_outputs = self.encoder(")]
    assert classify_phase(t5) == ("unknown", None)  # a text encoder is not CREPA's encoder
    windows = [("C:\\st\\.venv\\Lib\\site-packages\\diffusers\\models\\transformers\\transformer_wan.py",
                "forward", "")]
    assert classify_phase(windows) == ("transformer", "transformer_wan.py:forward")
    assert classify_phase([("/x/torch/optim/adamw.py", "step", "")]) == ("unknown", None)
    assert classify_phase([]) == ("unknown", None)


@pytest.mark.parametrize("frames, phase", [
    ([("/st/helpers/training/crepa.py", "_decode_latents", "decoded = vae.decode(latents).sample")], "vae_decode"),
    ([("/venv/crepa_mem/teacher.py", "iter_decoded_frames", "")], "vae_decode"),
    ([("/st/helpers/training/crepa.py", "_forward_encoder", "output = self.encoder(images)")], "encoder"),
    ([("/venv/crepa_mem/teacher.py", "encode_tokens", "out = encoder(pixel_values=images)")], "encoder"),
    ([("/root/.cache/torch/hub/facebookresearch_dinov2_main/dinov2/layers/block.py", "forward", "")], "encoder"),
    ([("/st/helpers/training/crepa.py", "_project_hidden_states", "projected = self.projector(flattened)")],
     "projector"),
    ([("/venv/crepa_mem/loss.py", "frame_similarity", "")], "projector"),
    ([("/st/helpers/models/wan/model.py", "model_predict", "model_output = self.model(")], "transformer"),
])
def test_phase_of_single_frames(frames, phase):
    assert classify_phase(frames)[0] == phase
