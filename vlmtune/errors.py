"""Every error vlmtune raises for something a user can fix, at the bottom of the house: data, model, run and stages
all raise them, and the CLI prints each as one line (``USER_ERRORS``); anything else is a bug.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """Contradictory or impossible settings, found before the model loads."""


class MergeError(ConfigError):
    """Adapters or saved trainables that do not fit the base model, or a merge that did not verify."""


class SaveError(ConfigError):
    """A checkpoint or model that could not be written (a full disk, a quota)."""


class MixtureError(ConfigError):
    """A ``--data_path`` / ``--eval_data_path`` list of files that cannot be drawn from (a bad weight or count, an
    unknown or empty file); the message names the flag and the entry."""


@dataclass(frozen=True)
class Problem:
    """One problem of a data file: an error (the file cannot train) or a warning, with the record it is in."""

    level: str  # "error" | "warning"
    message: str
    index: int | None = None
    id: str | None = None

    def format(self, file: str | Path) -> str:
        where = f"{file}"
        if self.index is not None:
            where += f": record {self.index}"
            if self.id is not None:
                where += f" (id {self.id!r})"
        return f"{where}: {self.message}"


class DataError(ValueError):
    """A data file with errors; ``str()`` lists every one of them."""

    def __init__(self, file: str | Path, problems: list[Problem]):
        self.file = str(file)
        self.problems = problems
        errors = [p for p in problems if p.level == "error"]
        lines = [p.format(file) for p in errors]
        super().__init__(f"{len(errors)} error(s) in {file}:\n  " + "\n  ".join(lines))


class FileError(Exception):
    """A data file that cannot be read as records at all (missing, unreadable, not JSON, wrong top level)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.problem = Problem("error", message)


class MediaError(ValueError):
    """A media file that cannot be used, with a message fit for the user."""


class LabelError(ValueError):
    """A record whose labels would not be exactly the replies that train; the message names the turn."""


class RecordError(RuntimeError):
    """A record that failed while being turned into model inputs (a file that only breaks when decoded).

    A DataLoader worker's exception comes back rebuilt from its whole traceback text; this keeps only the
    sentence that says which record and what went wrong, so the user reads one line.
    """

    def __init__(self, message: str):
        for cls in (c for c in type(self).__mro__ if c.__module__ == __name__):
            marker = f"{cls.__module__}.{cls.__name__}: "
            if marker in message:
                message = message.rsplit(marker, 1)[1].strip()
                break
        super().__init__(message)


class RewardError(RecordError):
    """A reward function that raised or returned something unusable, on one record."""


class NonFiniteLoss(ValueError):
    """A NaN or inf loss, with the step and the records of the batch."""


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; the CLI says so in one line and exits 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


USER_ERRORS = (ConfigError, DataError, MediaError, RecordError, NonFiniteLoss, FileNotFoundError)
"""What the CLI prints as one line without a traceback (``--debug`` shows it)."""
