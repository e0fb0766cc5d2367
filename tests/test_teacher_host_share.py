"""crepa_mem.teacher.host_share: one read-only mapped host copy of the encoder, same features."""
import copy

import torch

from crepa_mem import CrepaConfig
from crepa_mem.teacher.host_share import map_host_copy, write_host_copy
from crepa_mem.teacher.path import encode_tokens
from crepa_mem.teacher.tiers import place
from crepa_mem.testing import tiny_dinov2


def test_mapped_copy_gives_the_same_features_and_views_the_file(tmp_path):
    enc = tiny_dinov2(num_layers=2)
    x = torch.randn(2, 3, 28, 28)
    ref = encode_tokens(copy.deepcopy(enc), x)
    p = place(enc, "swap", compute_device="cpu")
    path = tmp_path / "enc.safetensors"
    map_host_copy(enc, path)
    w = enc.encoder.layer[0].mlp.fc1.weight
    size = path.stat().st_size
    assert w.untyped_storage().nbytes() == size  # a view of the whole mapped file
    with p.active() as m:
        torch.testing.assert_close(encode_tokens(m, x), ref, rtol=0, atol=0)
    mtime = path.stat().st_mtime_ns
    other = tiny_dinov2(num_layers=2)  # a second rank: the matching file is kept, not rewritten
    write_host_copy(other, path)
    assert path.stat().st_mtime_ns == mtime


def test_a_file_that_does_not_match_is_rewritten(tmp_path):
    path = tmp_path / "enc.safetensors"
    write_host_copy(tiny_dinov2(num_layers=1), path)
    small = path.stat().st_size
    map_host_copy(tiny_dinov2(num_layers=3), path)
    assert path.stat().st_size > small


def test_config_allows_sharing_only_for_swap():
    import pytest

    from crepa_mem.errors import CrepaConfigError

    assert CrepaConfig(encoder_tier="swap", host_share_path="/d/x.safetensors").host_share_path
    with pytest.raises(CrepaConfigError, match="crepa_mem_host_share_path"):
        CrepaConfig(encoder_tier="stream", host_share_path="/d/x.safetensors")


def test_ranks_arriving_together_map_one_file(tmp_path):
    import threading

    path, inodes = tmp_path / "enc.safetensors", []
    models = [tiny_dinov2(num_layers=2) for _ in range(4)]
    barrier = threading.Barrier(len(models))

    def rank(m):
        barrier.wait()
        map_host_copy(m, path)
        inodes.append(path.stat().st_ino)

    threads = [threading.Thread(target=rank, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(inodes)) == 1 and not list(tmp_path.glob(".*.tmp"))  # written once, by one of them
