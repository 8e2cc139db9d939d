"""Run `vlmtune train` segments one after another, each in a child forked from this process, killing some of them
at a chosen moment: ``python tests/segments.py SPEC.json RESULTS.json``.

vlmtune and transformers are imported once here; each child starts from that state (nothing has run in this
process, so forking is safe) and runs ``vlmtune.cli.main``. A kill is ``os._exit`` at a point of the code, never
a timer, so every run is the same. The spec is a list of segments::

    {"argv": ["train", ...], "kill": {"at": "mid-save", "step": 4} or null, "log": "path", "mkdir": ["path"]}

``mkdir`` folders are made before the segment starts (e.g. the empty ``checkpoint-N`` an older kill left).
Kill points (``step`` is the global step, 1-based):

* ``step``: inside step ``step``, after its backward, before the optimizer moves;
* ``sigterm``: a real SIGTERM sent to the process inside step ``step`` (the run saves and stops cleanly);
* ``mid-save``: in the save of checkpoint ``step``, after the model files, before the optimizer state;
* ``publish``: every file of checkpoint ``step`` written, before it is renamed into place;
* ``rotate``: checkpoint ``step`` in place, before older ones are rotated away;
* ``disk-full``: the save of checkpoint ``step`` fails with ENOSPC when it writes the optimizer state, as Python's
  own file writes report a full disk (the run must stop in one line and remove the partial checkpoint).

RESULTS.json gets the exit status of each segment; each segment's stdout and stderr go to its ``log``.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import matplotlib
import torch
from transformers import Trainer

import vlmtune.cli
import vlmtune.stages.sft  # noqa: F401  (imported before forking)
from vlmtune import checkpoints
from vlmtune.stages import trainer

matplotlib.use("Agg")  # as vlmtune.plots does, at the end of every run
import matplotlib.pyplot  # noqa: E402, F401  (imported before forking)

KILLED = 17


def arm(kill: dict) -> None:
    at, step = kill["at"], int(kill["step"])

    if at in ("step", "sigterm"):
        training_step = trainer.VisionLanguageTrainer.training_step

        def in_step(self, *args, **kwargs):
            loss = training_step(self, *args, **kwargs)
            if self.state.global_step + 1 == step:
                if at == "step":
                    os._exit(KILLED)
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

        trainer.VisionLanguageTrainer.training_step = in_step
    elif at in ("mid-save", "disk-full"):
        save_optimizer = Trainer._save_optimizer_and_scheduler
        save = torch.save

        def full_disk(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.pt"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return save(obj, f, *args, **kwargs)

        def in_save(self, output_dir):
            if self.state.global_step == step:
                if at == "mid-save":
                    os._exit(KILLED)
                torch.save = full_disk
            return save_optimizer(self, output_dir)

        Trainer._save_optimizer_and_scheduler = in_save
    elif at == "publish":
        publish = checkpoints.publish_checkpoint

        def before_publish(staged, final):
            if final.name == f"checkpoint-{step}":
                os._exit(KILLED)
            return publish(staged, final)

        checkpoints.publish_checkpoint = before_publish
    elif at == "rotate":
        rotate = checkpoints.rotate_checkpoints

        def before_rotate(output_dir, limit, newest, best=None):
            if newest.name == f"checkpoint-{step}":
                os._exit(KILLED)
            return rotate(output_dir, limit, newest, best)

        checkpoints.rotate_checkpoints = before_rotate
    else:
        raise ValueError(f"unknown kill point {at!r}")


def run_segment(segment: dict) -> int:
    for folder in segment.get("mkdir", []):
        Path(folder).mkdir(parents=True, exist_ok=True)
    log = os.open(segment["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pid = os.fork()
    if pid == 0:  # the child: one `vlmtune` command
        code = 99
        try:
            os.dup2(log, 1)
            os.dup2(log, 2)
            if segment.get("kill"):
                arm(segment["kill"])
            code = vlmtune.cli.main(segment["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(log)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(spec_path: str, results_path: str) -> None:
    segments = json.loads(Path(spec_path).read_text())
    gc.freeze()  # what the children inherit is never garbage: no collection in them walks it (nor copies its pages)
    codes = [run_segment(segment) for segment in segments]
    Path(results_path).write_text(json.dumps(codes))


if __name__ == "__main__":
    main(*sys.argv[1:])
