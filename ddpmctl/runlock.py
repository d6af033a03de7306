"""The run's lock: one process at a time trains (or prunes) a run.

:class:`RunLock` holds an exclusive ``flock`` on ``RUN_DIR/.lock`` while the process training the run
(rank 0) or ``checkpoints prune`` works on it, and refuses with :class:`RunInUseError` while another
process holds it; :func:`is_training` asks whether one does without writing anything. The lock belongs
to the open file, so a killed process never leaves a stale lock behind. Where ``fcntl`` is missing
(Windows) nothing is locked.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError, ConfigError
from .layout import LOCK

try:  # POSIX only: on Windows runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------- the run's lock


class RunInUseError(CheckpointError):
    """Another process holds the run's lock (it is training this run)."""


_HELD: set[Path] = set()  # run folders whose lock this process holds (flock also conflicts within one process)


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` while this process trains (or prunes) the run.

    The lock belongs to the open file: closing it (release, or the process ending, even by kill -9)
    frees it, so a stale lock file never blocks anyone. The file holds the owner's pid, for the message,
    and is removed on release (a process that opened it just before checks it still is the file at
    that path once it has the lock, and otherwise starts over). Where ``fcntl`` is missing (Windows)
    nothing is locked.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, create: bool = False) -> RunLock:
        """Take the lock (``create``: make the run folder first); RunInUseError if another process has it."""
        if self._fd is not None or fcntl is None:
            return self
        while True:
            try:
                if create:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                what = "create the run folder" if create and not self.run_dir.is_dir() else "write to"
                hint = "; pass a --working-directory you can write to" if create else ""
                raise ConfigError(f"cannot {what} {self.run_dir}: {exc.strerror or exc}{hint}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                os.close(fd)
                raise in_use_error(self.run_dir, owner) from None
            except OSError:  # a file system without locks (some network mounts): go on unlocked
                os.close(fd)
                return self
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except OSError:
                pass
            os.close(fd)  # the previous holder removed this file as we opened it: take the new one
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the message
        self._fd = fd
        _HELD.add(self.run_dir.resolve())
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            _HELD.discard(self.run_dir.resolve())
            try:
                os.unlink(self.path)  # while still locked: whoever opens the path next gets a new file
            except OSError:
                pass
            os.close(fd)  # closing the file frees the lock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def in_use_error(run_dir: Path, owner: int | None = None) -> RunInUseError:
    """The error for a run another process holds; ``owner`` (else the lock file, read-only) names its pid."""
    if owner is None:
        try:
            text = (run_dir / LOCK).read_text()[:32].strip()
        except OSError:
            text = ""
        owner = int(text) if text.isdigit() else None
    return RunInUseError(f"run {run_dir} is in use by another ddpmctl process{f' (pid {owner})' if owner else ''}: "
                         "wait for it to finish or stop it first")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_training(run_dir: str | Path) -> bool | None:
    """Whether another process holds ``run_dir``'s lock now (trains it), asked without writing anything: the
    lock file is opened read-only and share-locked for a moment. None where it cannot be known (no fcntl,
    an unreadable folder)."""
    run_dir = Path(run_dir)
    if fcntl is None:
        return None
    if run_dir.resolve() in _HELD:
        return False
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:  # a training process always has its lock file on disk
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # closing frees the share lock
    return False
