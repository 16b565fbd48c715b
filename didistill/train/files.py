"""Every file operation on a run directory, for local paths and object stores (`gs://`).

Paths are plain strings; each operation goes through `etils.epath.Path`, which uses the OS for
local paths and fsspec (gcsfs) or `tf.io.gfile` for `gs://`, `s3://`, ... (orbax writes its
checkpoints to the same places through tensorstore). What differs on an object store:

- `write_text_atomic`: locally a temporary file in the same directory, flushed and fsynced,
  then renamed over the target, and the directory fsynced: a reader sees the old file or the
  new one, never half. On an object store an object is written by one upload that becomes
  visible only when complete (GCS, S3), so the file is written directly: same guarantee.
- `open_append`: object stores cannot append; `AppendLog` keeps the lines written so far and
  rewrites the whole object at each write (metrics files are small: one line per log window).
- `rename` of a directory is atomic locally; on an object store it copies and deletes object
  by object, so a run killed during it may leave both halves (nothing is lost).
- `fsync` and `flock` exist only locally (see `workdir.WorkdirLock` for the lock on object
  stores).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator

from etils import epath

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path) -> bool:
    """False for `gs://...`, `s3://...` and other URIs; True for a path of this machine."""
    return not _URI.match(os.fspath(path))


def join(base, *parts: str) -> str:
    return str(epath.Path(base).joinpath(*parts))


def absolute(p) -> str:
    """The absolute form of a local path; a URI as it is (`os.path.abspath` would break it)."""
    p = os.fspath(p)
    return os.path.abspath(p) if is_local(p) else p.rstrip("/")


def normalize(p) -> str:
    """`os.path.normpath` for a local path (no trailing slash); a URI without a trailing '/'."""
    p = os.fspath(p)
    return os.path.normpath(p) if is_local(p) else p.rstrip("/")


def exists(p) -> bool:
    return epath.Path(p).exists()


def isdir(p) -> bool:
    return epath.Path(p).is_dir()


def makedirs(p) -> None:
    epath.Path(p).mkdir(parents=True, exist_ok=True)


def listdir(p) -> list[str]:
    """The names in directory `p` ([] if it does not exist)."""
    path_ = epath.Path(p)
    if not path_.is_dir():
        return []
    return sorted(child.name for child in path_.iterdir())


def walk_files(directory) -> Iterator[str]:
    """The paths of every file under `directory` (by `iterdir`: fsspec's `walk` drops the
    `gs://` of the paths it yields)."""
    for child in sorted(epath.Path(directory).iterdir()):
        if child.is_dir():
            yield from walk_files(child)
        else:
            yield str(child)


def open_file(p, mode: str = "r"):
    """`epath.Path(p).open(mode)` (the builtin file object for a local path)."""
    return epath.Path(p).open(mode)


def read_text(p) -> str:
    return epath.Path(p).read_text()


def sha256_file(p) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (local or gs://)."""
    digest = hashlib.sha256()
    with open_file(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rename(source, target) -> None:
    """Renames a file or directory; refuses to overwrite an existing target."""
    epath.Path(source).rename(target)


def replace(source, target) -> None:
    """Renames the file `source` over `target` (atomic locally)."""
    epath.Path(source).replace(target)


def remove(p) -> None:
    epath.Path(p).unlink()


def write_text_atomic(p, text: str) -> None:
    """Writes `text` to `p` so that a reader sees the old contents or the new, never half."""
    p = os.fspath(p)
    if not is_local(p):
        epath.Path(p).write_text(text)  # one upload: visible only once complete
        return
    directory = os.path.dirname(os.path.abspath(p))
    tmp = os.path.join(directory, f".{os.path.basename(p)}.tmp-{os.getpid()}")
    try:
        with epath.Path(tmp).open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        epath.Path(tmp).replace(p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AppendLog:
    """A text file that grows by lines: appended and flushed locally; on an object store (no
    append) the lines are kept and the whole object rewritten at each `write`."""

    def __init__(self, p, initial_lines: list[str]):
        self.path = os.fspath(p)
        self._local = is_local(self.path)
        write_text_atomic(self.path, "".join(initial_lines))
        if self._local:
            self._file = epath.Path(self.path).open("a")
        else:
            self._lines = list(initial_lines)

    def write(self, line: str) -> None:
        if self._local:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            epath.Path(self.path).write_text("".join(self._lines))

    def close(self) -> None:
        if self._local and self._file is not None:
            self._file.close()
            self._file = None


__all__ = [
    "AppendLog",
    "absolute",
    "exists",
    "is_local",
    "isdir",
    "join",
    "listdir",
    "makedirs",
    "normalize",
    "open_file",
    "read_text",
    "remove",
    "rename",
    "sha256_file",
    "replace",
    "walk_files",
    "write_text_atomic",
]
