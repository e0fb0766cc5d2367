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


def test_count_as_puts_the_cpu_side_of_a_backward_on_the_fake_gpu():
    """A CPU-only autograd engine cannot run a backward of CUDA tensors: the loss side runs on fake CPU
    tensors counted on the fake GPU, and only what is made inside the block moves over."""
    with fake_gpu() as t:
        host = torch.empty(1000)                       # made before: stays the host's
        with t.count_as("cpu", FAKE_GPU), torch.enable_grad():
            x = torch.empty(10, 8, requires_grad=True)
            w = torch.empty(8, 3, requires_grad=True)
            (x @ w).sum().backward()
        assert t.live_bytes("cpu") == host.untyped_storage().nbytes()
        # x, w and their gradients live on; the (10, 3) product (freed after the sum) and the scalars are gone
        assert t.live_bytes(FAKE_GPU) == 2 * (10 * 8 + 8 * 3) * 4
        assert t.peak_bytes(FAKE_GPU) == t.live_bytes(FAKE_GPU) + 2 * 4  # + the sum and backward's seed


def test_scalar_reads_take_the_healthy_path_and_h2d_copies_are_counted():
    with fake_gpu() as t:
        x = torch.empty(4, 4, device=FAKE_GPU)
        assert bool(torch.isfinite(x).all()) and not bool(torch.isnan(x).any()) and x.sum().item() == 1.0
        with t.phase("decode"):
            torch.empty(256, dtype=torch.bfloat16).to(FAKE_GPU)
            x.copy_(torch.empty(4, 4))
        torch.empty(8).to(FAKE_GPU)
    assert t.h2d["decode"] == 256 * 2 + 16 * 4 and t.h2d["all"] == t.h2d["decode"] + 8 * 4
