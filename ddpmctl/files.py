"""File-system helpers every writer shares: atomic replacement, fsync, hashing, folders made and tidied.

Imports nothing of ddpmctl but its error types.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (where the file system can fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends, removed if it fails.

    Readers see the old file or the new one, never a half-written one. ``fsync``: flush the new file to
    disk before the rename (for files that must survive a power cut, such as exported weights).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(folder: Path, option: str) -> None:
    """Create ``folder`` and write a scratch file in it, or raise ConfigError naming ``option``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ddpmctl-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write to {folder}: {exc.strerror or exc}; pass a {option} you can write to") from None


def cannot_write(folder: Path) -> str | None:
    """Why ``folder`` could not be created or written to (None: it could), found without writing anything."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def missing_folders(*paths: Path) -> list[Path]:
    """The folders that creating ``paths`` would make, deepest first (each path's missing ancestors too)."""
    out: list[Path] = []
    for path in paths:
        chain: list[Path] = []
        while not path.exists() and path.parent != path:
            chain.append(path)
            path = path.parent
        out += [p for p in chain if p not in out]
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty; one that is not (any more) stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
