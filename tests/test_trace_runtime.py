"""crepa_mem.trace.runtime: the fake cuda:0, live-byte counting, kernels that behave like the GPU's."""

import torch

from crepa_mem.trace.runtime import FAKE_GPU, fake_gpu

MiB = 2**20
SMALL = dict(model="wan-2.1-1.3b", frames=9, height=64, width=64, encoder="dinov2_vits14", image_size=56)


def test_live_bytes_counts_storages_once_and_frees_them():
    with fake_gpu() as b:
        x = torch.empty(1024, device=FAKE_GPU)                 # 4 KiB
        view = x[10:20]                                         # same storage
        y = torch.empty(256, dtype=torch.bfloat16, device=FAKE_GPU)  # 512 B
        host = torch.empty(100)                                 # on the CPU, not counted for the GPU
        assert b.live_bytes() == 4096 + 512 and b.live_bytes("cpu") == 400
        del x, view
        assert b.live_bytes() == 512 and b.peak_bytes() == 4096 + 512
        with b.phase("p") as peaks:
            z = y.float()                                       # 1 KiB more
            del z
        assert peaks[str(FAKE_GPU)] == 512 + 1024 and b.live_bytes() == 512
        assert host.device.type == "cpu"


def test_indexing_and_copies_on_the_fake_gpu_behave_like_torch():
    with fake_gpu() as b:
        x = torch.empty(2, 3, 8, 5, device=FAKE_GPU)
        assert x[:, :, 2:4].shape == (2, 3, 2, 5) and x[1, ..., None].shape == (3, 8, 5, 1)
        assert x[:, torch.tensor([0, 2], device=FAKE_GPU)].shape == (2, 2, 8, 5)
        before = b.live_bytes()
        x[0, 1] = x[1, 2]                                       # in place: no new storage
        x.transpose(1, 2).contiguous()                          # a copy, freed at once
        assert b.live_bytes() == before


def test_attention_runs_as_the_fused_gpu_kernel_not_the_math_path():
    heads, length, dim = 8, 4096, 64
    with fake_gpu() as b:
        q = torch.empty(1, heads, length, dim, device=FAKE_GPU)
        before = b.live_bytes()
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        assert out.shape == q.shape
        scores = heads * length * length * 4  # what the math path would materialise (512 MiB)
        extra = b.peak_bytes() - before - out.untyped_storage().nbytes()
        assert 0 <= extra < scores / 1000


def test_a_budget_makes_the_fake_gpu_run_out_of_memory_like_a_card():
    import pytest

    with fake_gpu(budget_bytes=8192) as b:
        x = torch.empty(1024, device=FAKE_GPU)                  # 4 KiB: fits
        with pytest.raises(torch.OutOfMemoryError, match="simulated out of memory on cuda:0"):
            torch.empty(2048, device=FAKE_GPU)                  # 8 KiB more: does not
        assert b.live_bytes() == 4096                           # the failed allocation was never counted
        del x
        torch.empty(2048, device=FAKE_GPU)                      # freed memory is usable again
        torch.empty(10**6)                                      # the host has no budget
