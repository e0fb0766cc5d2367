"""fileio: atomic writes (temp + fsync + rename + folder fsync), capped reads, one-line OS errors."""
import errno
import gzip
import os
import stat

import pytest

from crepa_mem import fileio
from crepa_mem.fileio import current_umask, respect_umask


def test_atomic_write_replaces_whole_files_and_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real = fileio.fsync_dir
    monkeypatch.setattr(fileio, "fsync_dir", lambda d: (synced.append(str(d)), real(d)))
    target = tmp_path / "sub" / "x.json"
    fileio.atomic_write(target, "one")
    fileio.atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and synced == [str(target.parent)] * 2
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_a_write_killed_before_the_rename_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    fileio.atomic_write(target, b"old")

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_read_capped_stops_a_gzip_bomb_at_the_cap(tmp_path):
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(gzip.compress(b"\0" * 1_000_000))
    assert bomb.stat().st_size < 5_000
    with pytest.raises(fileio.TooLargeError, match="more than 10000 bytes once decompressed"):
        fileio.read_capped(bomb, 10_000)
    assert len(fileio.read_capped(bomb, 1_000_000)) == 1_000_000
    plain = tmp_path / "plain.pt"
    plain.write_bytes(b"x" * 20)
    with pytest.raises(fileio.TooLargeError):
        fileio.read_capped(plain, 19)
    assert fileio.read_capped(plain, 20) == b"x" * 20


@pytest.mark.parametrize("code, words", [(errno.EROFS, "the filesystem is read-only (errno 30)"),
                                         (errno.ENOSPC, "the disk is full (errno 28)")])
def test_os_errors_are_one_line_naming_the_file(code, words):
    assert fileio.describe_os_error(OSError(code, os.strerror(code), "/x/y")) == f"cannot write '/x/y': {words}"
    assert fileio.describe_os_error(OSError(code, os.strerror(code)), what="standard output") == \
        f"cannot write 'standard output': {words}"


def test_other_os_errors_name_the_file_without_claiming_a_write():
    assert fileio.describe_os_error(OSError(errno.EIO, "Input/output error", "/x")) == \
        "cannot access '/x': Input/output error (errno 5)"


# ------------------------------------------------------------------ the umask


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask_002):
    assert current_umask() == 0o002
    assert current_umask() == 0o002


def test_store_entries_and_projector_follow_the_umask(tmp_path, umask_002):
    from crepa_mem.integrations.wrap import save_projector
    from crepa_mem.loss import build_projector
    from crepa_mem.fileio import atomic_write

    atomic_write(tmp_path / "entry.bin", b"x")
    assert mode(tmp_path / "entry.bin") == 0o664  # mkstemp alone gives 0600
    path = save_projector(build_projector(8, 4), tmp_path)
    assert mode(path) == 0o664
    os.umask(0o077)
    assert mode(respect_umask(path)) == 0o600
