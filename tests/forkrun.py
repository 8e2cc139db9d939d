"""torchrun for the tests, without its start-up cost: ``python tests/forkrun.py --nproc_per_node N --master_port P
(-m vlmtune.cli | SCRIPT.py) ARGS...`` runs N ranks of one command on this machine, as
``python -m torch.distributed.run`` with the same arguments does.

A torchrun start imports torch in the launcher, then torch, transformers, PEFT and DeepSpeed again in every rank:
about 15 s of CPU per rank on the 2 cores of CI, more than the training steps of most tests. Here the launcher
imports them once, and every rank is a child forked from it before anything has run (nothing has started a thread,
as in tests/segments.py), with the environment torchrun gives its workers. The ranks then run the command's own
code: `vlmtune.cli.main`, or the script as ``__main__``. Where a test is about the launcher itself (the scripts,
scripts/launch.sh), it keeps torchrun.

As torchrun does: the ranks' output goes to this process's stdout / stderr; when a rank fails, the others get
SIGTERM, then SIGKILL after a grace period, and this process exits 1 after one line per failed rank (its exit code,
or the signal that ended it, e.g. ``exitcode -9 (SIGKILL)``).
"""

from __future__ import annotations

import argparse
import gc
import os
import runpy
import signal
import sys
import time
import traceback

import matplotlib
import torch  # noqa: F401  (imported before forking: the point of this launcher)
import transformers  # noqa: F401

import vlmtune.cli
import vlmtune.stages.sft  # noqa: F401

try:
    import deepspeed  # noqa: F401
except ImportError:  # the deepspeed extra is not installed
    pass

matplotlib.use("Agg")  # as vlmtune.plots does, at the end of every run
import matplotlib.pyplot  # noqa: E402, F401

GRACE_S = 30
CHECK_GROUPS = "FORKRUN_CHECK_GROUPS"
"""Set (to anything) in the environment: a rank whose ``vlmtune.cli`` command succeeded fails if a gloo process
group is still alive after it (``vlmtune.stages.fit.close_process_groups``)."""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="forkrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc_per_node", type=int, required=True)
    parser.add_argument("--master_port", type=int, required=True)
    parser.add_argument("-m", dest="module", help="only vlmtune.cli")
    args, rest = parser.parse_known_args(argv)
    if args.module not in (None, "vlmtune.cli"):
        parser.error("-m takes vlmtune.cli only")
    if args.module is None and not rest:
        parser.error("give -m vlmtune.cli or a script")
    return args, rest


def rank_main(rank: int, world: int, port: int, module: str | None, rest: list[str]) -> int:
    """One rank, in the forked child: torchrun's worker environment, then the command."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                       "ROLE_WORLD_SIZE": str(world), "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0",
                       "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "forkrun"})
    if module:
        sys.argv = [vlmtune.cli.__file__, *rest]
        code = vlmtune.cli.main(rest)
        left = gloo_threads() if code == 0 and os.environ.get(CHECK_GROUPS) else 0
        if left:  # the command is done: a group still alive would be freed at interpreter exit, in any order
            print(f"[forkrun] rank {rank}: {left} gloo threads still alive after the command: a process group "
                  "outlived it", file=sys.stderr)
            return 1
        return code
    sys.argv = rest
    try:
        runpy.run_path(rest[0], run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def gloo_threads() -> int:
    """The threads of this process's gloo process groups (2 run loops and a transport loop each), by name."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                count += "gloo" in comm.read()
        except OSError:  # the thread ended meanwhile
            pass
    return count


def describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"exitcode {code} ({signal.Signals(-code).name})" if code < 0 else f"exitcode {code}"


def main(argv: list[str]) -> int:
    args, rest = parse(argv)
    children: dict[int, int] = {}  # pid -> rank
    gc.freeze()  # what the ranks inherit is never garbage: no collection in them walks it (nor copies its pages)
    for rank in range(args.nproc_per_node):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = rank_main(rank, args.nproc_per_node, args.master_port, args.module, rest)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        children[pid] = rank
    failed: list[str] = []
    deadline = None
    while children:
        if deadline is None:
            pid, status = os.wait()
        else:  # a rank failed: the others have until the deadline to stop on SIGTERM
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if time.monotonic() > deadline:
                    for other in children:
                        os.kill(other, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.1)
                continue
        rank = children.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(f"[forkrun] rank {rank} (pid {pid}) failed: {describe(status)}")
            if deadline is None:
                for other in children:
                    os.kill(other, signal.SIGTERM)
                deadline = time.monotonic() + GRACE_S
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
