"""The one-line errors of a failed write (a full disk, a quota, an I/O error) while a run saves."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from vlmtune import checkpoints
from vlmtune.errors import SaveError


def _write_failure(exc: BaseException) -> str | None:
    """What went wrong, when ``exc`` is a failed write (a full disk, a quota, an I/O error), else None.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos``,
    safetensors as ``SafetensorError: ... No space left on device (os error 28)`` (measured on a full tmpfs)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" or "inline_container" in text or "PytorchStreamWriter" in text:
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def _free_space(folder: Path) -> str:
    for path in (folder, *folder.parents):
        if path.exists():
            free = shutil.disk_usage(path).free
            for unit in ("B", "KiB", "MiB", "GiB"):
                if free < 1024 or unit == "GiB":
                    return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
                free /= 1024
    return "unknown"


def save_failed(exc: BaseException, what: str, folder: Path) -> SaveError | None:
    """The one-line error for a failed write of ``what`` into ``folder``, or None when ``exc`` is no write failure."""
    reason = _write_failure(exc)
    if reason is None:
        return None
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(exc)
    found = checkpoints.scan_checkpoints(folder).complete
    last = f"the last complete checkpoint is {found[-1][1]}" if found else "no checkpoint is complete yet"
    return SaveError(f"writing {what} failed: {reason} ({_free_space(folder)} free on the disk of {folder}); "
                         f"{last}. {'Free space' if full else 'Fix the disk'} or give another --output_dir, then "
                         "run the same command with --resume_from_checkpoint last")
