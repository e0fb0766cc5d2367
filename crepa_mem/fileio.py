"""Files that are never half-written and reads that never run away: the one home for both.

`atomic_write(path, data)`: temp file in the same folder → fsync → os.replace → fsync of the folder,
so a crash leaves either the old file or the whole new one, and the rename itself survives a power cut.
`read_capped(path, limit)`: a file's bytes (gunzipped when gzip) refusing to grow past `limit`, so a
small gzip bomb cannot fill memory. `describe_os_error(err)`: one line for a read-only filesystem, a
full disk or a missing permission, naming the file.
"""
from __future__ import annotations

import errno
import gzip
import os
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"
GZIP_MAGIC = b"\x1f\x8b"


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def respect_umask(path: str | os.PathLike, mode: int = 0o666) -> Path:
    """chmod `path` to what open() would have created: `mode` less the umask (temp-then-rename writes
    and safetensors' writer leave 0600 otherwise)."""
    os.chmod(path, mode & ~current_umask())
    return Path(path)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the data itself was fsynced
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, prefix: str = TMP_PREFIX) -> Path:
    """Write `data` to `path` atomically; the temp file (`prefix`…`.part`) is removed on any failure."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        respect_umask(tmp)  # mkstemp makes 0600: a cache shared between users or containers stays readable
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


class TooLargeError(ValueError):
    """A file (or its gzip content) larger than the caller's cap."""


def read_capped(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of `path`, gunzipped if it is gzip; TooLargeError past `limit` bytes (either form)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f) if head == GZIP_MAGIC else f
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(f"{str(path)!r} holds more than {limit} bytes"
                            + (" once decompressed" if head == GZIP_MAGIC else ""))
    return data


_OS_HINTS = {
    errno.EROFS: "the filesystem is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


_WRITE_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def describe_os_error(err: OSError, action: str | None = None, what: str | os.PathLike = "") -> str:
    """'cannot write FILE: the disk is full (errno 28)' — one line for a filesystem failure."""
    action = action or ("write" if err.errno in _WRITE_ERRNOS else "access")
    reason = _OS_HINTS.get(err.errno or -1, err.strerror or type(err).__name__)
    name = err.filename if err.filename is not None else what
    where = f" {str(name)!r}" if name else ""
    return f"cannot {action}{where}: {reason} (errno {err.errno})"
