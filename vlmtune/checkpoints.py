"""The checkpoint lifecycle of a run folder, and the lock that keeps one run per folder.

The Trainer writes a checkpoint in place, file by file: a process killed during a save leaves a ``checkpoint-N``
folder with some of its files, which transformers' own "newest checkpoint" then picks and fails on. vlmtune has
every rank write into ``tmp-checkpoint-N/checkpoint-N`` (``staging_dir``) and renames the folder to
``checkpoint-N`` once all ranks are done (``publish_checkpoint``), so a ``checkpoint-N`` is always complete
(``checkpoint_problem`` still checks, for folders written by other tools or versions). ``rotate_checkpoints``
then applies ``--save_total_limit`` to complete checkpoints only, and ``resolve_resume`` turns
``--resume_from_checkpoint`` into a checked folder.

The file names are the run folder's, defined in ``vlmtune.run``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlmtune.errors import ConfigError
from vlmtune.run import CHECKPOINT_PREFIX, LOCK_FILE, STAGING_PREFIX, TRAINER_STATE

logger = logging.getLogger(__name__)

RESUME_NEWEST = ("last", "auto")
"""``--resume_from_checkpoint`` values that mean the newest complete checkpoint of ``--output_dir``."""
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json", "latest")  # latest: a DeepSpeed checkpoint
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_STAGING_NAME = re.compile(rf"^{STAGING_PREFIX}-(\d+)")


def checkpoint_problem(folder: Path) -> str | None:
    """Why a ``checkpoint-N`` folder cannot be resumed from, or None when it is complete."""
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{TRAINER_STATE} is unreadable"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return "no model or adapter weights"
    return None


@dataclass
class Checkpoints:
    """The checkpoints of a run folder: complete ones by step, and what a resume must skip."""

    complete: list[tuple[int, Path]]
    incomplete: list[tuple[int, Path, str]]  # (step, folder, why)


def scan_checkpoints(output_dir: str | Path) -> Checkpoints:
    """The complete and incomplete checkpoints of ``output_dir`` (none when it does not exist), by step."""
    folder = Path(output_dir)
    complete, incomplete = [], []
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        final, staged = _CHECKPOINT_NAME.match(child.name), _STAGING_NAME.match(child.name)
        if not child.is_dir() or not (final or staged):
            continue
        if staged:
            incomplete.append((int(staged.group(1)), child, "a save that did not finish"))
        elif problem := checkpoint_problem(child):
            incomplete.append((int(final.group(1)), child, problem))
        else:
            complete.append((int(final.group(1)), child))
    return Checkpoints(sorted(complete), sorted(incomplete))


def resolve_resume(value: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` means, checked, or None to start from step 0.

    ``last`` / ``auto``: the newest complete checkpoint of ``output_dir``, named in one line, each newer incomplete
    one skipped with a one-line note; with none, ``last`` stops and ``auto`` starts from step 0 (one command for
    the first start and every restart of a preempted job). A path must be a complete checkpoint."""
    if not value:
        return None
    if value.lower() in RESUME_NEWEST:
        found = scan_checkpoints(output_dir)
        newest = found.complete[-1] if found.complete else None
        for step, path, why in found.incomplete:
            if newest is None or step > newest[0]:
                logger.info("skipping %s: incomplete (%s)", path, why)
        if newest is not None:
            logger.info("resuming from %s (step %d)", newest[1], newest[0])
            return str(newest[1])
        if value.lower() == "auto":
            logger.info("no complete checkpoint in %s: starting from step 0", output_dir)
            return None
        raise ConfigError(f"--resume_from_checkpoint last: {output_dir} holds no complete checkpoint; start without "
                          "the flag, or use `auto` (resumes when there is one)")
    path = Path(value)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ConfigError(f"--resume_from_checkpoint {value} {what}; give a checkpoint-N folder, or `last` for the "
                          "newest complete checkpoint in --output_dir")
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    inside = scan_checkpoints(path).complete  # a run folder given instead of one of its checkpoints
    beside = [p for p in scan_checkpoints(path.parent).complete if p[1] != path]
    hint = (f"; it is a run folder, whose newest complete checkpoint is {inside[-1][1]}" if inside else
            f"; the newest complete one beside it is {beside[-1][1]}" if beside else "")
    raise ConfigError(f"--resume_from_checkpoint {value} is not a complete checkpoint ({problem}){hint}; or use "
                      "`last` for the newest complete checkpoint in --output_dir")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The folder of the complete checkpoint of ``step``."""
    return Path(output_dir, f"{CHECKPOINT_PREFIX}-{step}")


def staging_dir(output_dir: str | Path, step: int) -> Path:
    """Where the Trainer writes checkpoint ``step`` (its ``checkpoint-N`` inside) before it is published."""
    return Path(output_dir, f"{STAGING_PREFIX}-{step}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(staged: Path, final: Path, aside: Path | None = None) -> None:
    """Give a fully written folder its final name in one rename, after its files reached the disk.

    A folder already at ``final`` (a checkpoint of the same step from a run that went further before it was resumed
    from an earlier one; a merge output replaced with ``--force``) is moved to ``aside`` (default: a hidden name
    beside it) first and removed last; if the rename fails it is put back. Used for checkpoints and merged model
    folders alike."""
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            _fsync(path)
    old = None
    if final.exists():
        old = aside or final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    try:
        staged.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Publish the checkpoint written at ``staged`` (``tmp-checkpoint-N/checkpoint-N``) as ``final``
    (``checkpoint-N``), then remove its staging folder. A replaced checkpoint goes aside under a staging name,
    which a later scan counts as an unfinished save (and rotation removes) if the process dies before it does."""
    step = final.name.rsplit("-", 1)[-1]
    publish_folder(staged, final, aside=final.parent / f"{STAGING_PREFIX}-{step}-replaced")
    if staged.parent != final.parent:
        shutil.rmtree(staged.parent, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, limit: int | None, newest: Path, best: str | None = None) -> None:
    """After ``newest`` is complete: remove what unfinished saves left, then the oldest complete checkpoints
    beyond ``limit`` (``--save_total_limit``), in transformers' order, never ``newest`` nor the best one.

    Only complete checkpoints count: a folder a killed save left behind neither takes a place nor is kept
    as "the most recent"."""
    from transformers.trainer_utils import sort_checkpoints

    found = scan_checkpoints(output_dir)
    for _, path, _ in found.incomplete:
        if _STAGING_NAME.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
    if not limit or limit <= 0:
        return
    complete = {str(path) for _, path in found.complete}
    protected = {str(newest)} | ({str(Path(best))} if best else set())
    ordered = [p for p in sort_checkpoints(str(output_dir), use_mtime=True, best_model_checkpoint=best)
               if p in complete and p not in protected]
    excess = len(complete) - max(limit, len(protected & complete))
    for path in ordered[:max(excess, 0)]:
        logger.info("removing %s (--save_total_limit %d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)


class RunLock:
    """Holds ``output_dir/.vlmtune.lock`` while a run trains there, so a second run in the same folder stops
    instead of interleaving checkpoints. The lock is the kernel's (``flock``): it goes when the process does,
    however it ends, so a killed run never leaves a stale lock. The file names the holder (pid and host) for the
    second run's error, and goes on release, with the folder when the lock made it and nothing else was written.

    Not ``filelock.FileLock``: it keeps the lock file on release (so that waiters share one inode), which would
    leave a run that wrote nothing with a folder; unlinking it after release opens the race that the inode check
    below closes (a second run locking the unlinked file while a third locks a new one)."""

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise ``ConfigError`` naming the folder and the run that holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ConfigError(f"output folder {self.folder} is in use by another run ({holder}); wait for it "
                                  "to end, or give another --output_dir") from None
            except OSError as exc:  # a filesystem without locks
                os.close(fd)
                logger.warning("cannot lock %s (%s): nothing stops a second run from using the same folder",
                               self.path, exc.strerror)
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the last holder removed the file between our open and our lock: lock the new one
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (its file goes with it) and remove the folder if the lock made it and it stayed empty."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.folder.rmdir()  # a run that wrote nothing leaves no folder
            except OSError:
                pass
