"""A fork server for the tests: the `vlmtune` commands they launch start as forks of one process that imported the
training stack once, instead of as fresh interpreters that import it again (about 15 s of CPU each here).

``run(cmd, ...)`` and ``Popen(cmd, ...)`` take the arguments of ``subprocess.run`` / ``subprocess.Popen`` that the
tests use. A command of the form ``python -m vlmtune.cli ...`` (from the repository root) or
``python tests/forkrun.py ...`` / ``python tests/segments.py ...`` is forked from the server; anything else (the
scripts/*.sh, torchrun, ``python -c``), or a command whose environment differs from the server's in a key read
at import time, runs as a real subprocess, unchanged.

The server (``python tests/forkserver.py SOCKET``, one per pytest process, started on first use, stopped at the
end of the session or when the pytest process goes) imports torch, transformers, PEFT, TRL, DeepSpeed, vlmtune's
stages and matplotlib (the plot at the end of each run), and then runs nothing: it checks that the imports started
no thread (no OpenMP pool, no tokenizers pool; only jemalloc's background thread, which is fork-safe) before it
serves, and freezes what it imported out of the garbage collector's reach (``gc.freeze``, as Python's documentation
advises before forking: a full collection in a child would otherwise walk the whole imported stack, about 0.7 s of
CPU each, and copy every page it touches). Each command is a child forked from it
with the caller's argv, working folder and environment, its stdin on /dev/null and its stdout / stderr on the
caller's files; it runs the module or script as ``__main__`` (``runpy``, as ``python -m`` / ``python SCRIPT`` do),
then, as the interpreter does at exit, joins its threads, runs the exit handlers, flushes, and exits with the code
the interpreter would give. Its pid is real (a test can signal it); it leads its own process group, so a timeout or
a failed test kills it with everything it forked.
The returncode is subprocess's: the exit code, or minus the signal that ended it.
"""

from __future__ import annotations

import atexit
import gc
import io
import json
import locale
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SCRIPTS = (str(TESTS / "forkrun.py"), str(TESTS / "segments.py"))
"""Test scripts that may be forked: they import nothing the server has not imported."""

LOG_KEY = "VLMTUNE_FORKSERVER_LOG"
"""Where set, the path of a file that gets one line per forked command: its CPU time (user + system, of the
command and everything it forked and waited for) and its argv. To measure the suite's launches."""

RUN_TIME_KEYS = frozenset({
    "VLMTUNE_CACHE",  # vlmtune.cache_dir(), read at each call
    "VLMTUNE_DEBUG",  # vlmtune.cli.main, read at each call
    "PYTHONUNBUFFERED",  # read by the interpreter at start: the child sets its stdout / stderr up as it says
    "PYTEST_CURRENT_TEST",  # pytest's own, changes with every test; nothing in the stack reads it
    LOG_KEY,  # this module's own (the client reads it)
    # set in os.environ by transformers / accelerate when a test trains in the pytest process itself (DeepSpeed,
    # FSDP), so inherited by every later command, as by a subprocess; read in functions only (TrainingArguments,
    # Accelerator, AcceleratorState), never at import
    "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING", "ACCELERATE_MIXED_PRECISION",
    # torch.distributed's rendezvous variables, likewise left by an in-process distributed set-up; read when a
    # process group starts (forkrun sets its ranks' own)
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    # set by torch's inductor when something in the pytest process asked for its cache folder; read per call
    "TORCHINDUCTOR_CACHE_DIR",
    # set by `import deepspeed` (os.environ.setdefault) when the pytest process imports it after the server
    # started; read by torch.cuda.is_available() at each call
    "PYTORCH_NVML_BASED_CUDA_CHECK",
    "FORKRUN_CHECK_GROUPS",  # tests/forkrun.py's own, read by each rank after its command
})
"""Environment keys in which a command may differ from the server: each is read at run time, not at import (any
other difference, e.g. OMP_NUM_THREADS, HF_HOME, TORCH_EXTENSIONS_DIR, makes the command a real subprocess)."""

SCRIPT_KEYS = frozenset({
    "PYTHON", "VLMTUNE_FORKSERVER_SOCKET", "VLMTUNE_FORKSERVER_REAL_PYTHON",  # script_env's own
    "PWD", "OLDPWD", "SHLVL", "_",  # set by bash for what it runs
    # the knobs of scripts/launch.sh that the tests set: read by bash (no module of vlmtune, torch, transformers,
    # accelerate, DeepSpeed, TRL, PEFT, datasets or huggingface_hub reads them from the environment)
    "MODEL_NAME", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR", "LR", "GLOBAL_BATCH_SIZE", "BATCH_PER_DEVICE",
    "LOGGING_STEPS", "MAX_SEQ_LENGTH", "GRADIENT_CHECKPOINTING", "LORA_RANK", "EPOCHS",
})
"""Further keys in which the ``vlmtune`` command of a script (``script_env``) may differ from the server."""

_HEADER = struct.Struct("!I")


# ---- the server ---------------------------------------------------------------------------------------------------

def _import_stack() -> None:
    """Everything a command would import, imported once here before any fork (nothing of it is run)."""
    import matplotlib
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import vlmtune.cli  # noqa: F401
    import vlmtune.evaluate  # noqa: F401
    import vlmtune.merge  # noqa: F401
    import vlmtune.predict  # noqa: F401
    import vlmtune.stages.sft  # noqa: F401

    matplotlib.use("Agg")  # as vlmtune.plots does before it imports pyplot, at the end of every training run
    import matplotlib.pyplot  # noqa: F401

    for optional in ("deepspeed", "trl", "vlmtune.stages.dpo", "vlmtune.stages.grpo", "vlmtune.stages.distill",
                     "vlmtune.stages.reward_model", "vlmtune.sample"):
        try:
            __import__(optional)
        except ImportError:  # an extra that is not installed: the command imports (and fails) as it would
            pass


FORK_SAFE_THREADS = ("jemalloc_bg_thd",)
"""Threads the imports may start that a fork does not break: the background thread of the jemalloc that pyarrow
bundles (jemalloc stops and restarts it around a fork with its own pthread_atfork handlers)."""


def _threads() -> list[str]:
    """The names of this process's threads besides the main one and the fork-safe ones."""
    names = [Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task")
             if int(task) != os.getpid()]
    return [name for name in names if name not in FORK_SAFE_THREADS]


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("the client went away")
        data += chunk
    return data


def _std_stream(fd: int, unbuffered: bool, errors: str, line_buffering: bool) -> io.TextIOWrapper:
    """sys.stdout / sys.stderr as a fresh interpreter builds them on ``fd`` (with or without PYTHONUNBUFFERED)."""
    raw = io.FileIO(fd, "w", closefd=False)
    binary = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(binary, encoding=sys.stdout.encoding, errors=errors,
                            line_buffering=line_buffering and not unbuffered, write_through=unbuffered)


def _exit_code(exc: SystemExit) -> int:
    """The exit status the interpreter gives for an uncaught SystemExit."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _command(request: dict) -> int:
    """In the forked child, the command itself: ``python -m MODULE ARGS`` or ``python SCRIPT ARGS``."""
    import random
    import runpy
    import threading

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    imported = (sys.stdout, sys.stderr)  # what logging handlers made at import hold (on the same fds 1 and 2)
    if unbuffered:
        for stream in imported:
            stream.reconfigure(line_buffering=True, write_through=True)
    sys.stdout = sys.__stdout__ = _std_stream(1, unbuffered, "strict", os.isatty(1))
    sys.stderr = sys.__stderr__ = _std_stream(2, unbuffered, "backslashreplace", True)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
    random.seed()  # a fresh interpreter seeds from the system; torch's default seed is fixed (and unused here)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    code = 0
    try:
        if request["module"]:
            sys.path[0] = os.getcwd()
            sys.modules.pop(request["module"], None)  # not yet imported, as in a fresh `python -m`
            sys.argv = ["-m", *request["args"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = str(Path(request["script"]).parent)
            sys.argv = [request["script"], *request["args"]]
            runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # as the interpreter does at exit: wait for the threads that are not daemons
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, *imported):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def _waiter(conn: socket.socket, listener: socket.socket) -> None:
    """In a child of the server: read one request, fork its command, report the pid, then the returncode."""
    listener.close()
    try:
        head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        head += _recv_exact(conn, _HEADER.size - len(head))
        request = json.loads(_recv_exact(conn, _HEADER.unpack(head)[0]))
    except (EOFError, OSError, ValueError):
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                os.close(fd)
            conn.close()
            code = _command(request)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(f"{pid}\n".encode())
    except OSError:
        pass
    _, status, usage = os.wait4(pid, 0)
    try:
        conn.sendall(f"{os.waitstatus_to_exitcode(status)} {usage.ru_utime + usage.ru_stime:.2f}\n".encode())
    except OSError:
        pass
    os._exit(0)


def serve(path: str) -> None:
    """Import the stack, check that nothing runs, then fork one waiter per request until stdin closes (the
    pytest process that started the server has gone or stopped it)."""
    reply = os.fdopen(os.dup(1), "w")  # the readiness line; what the imports print goes to the log
    os.dup2(2, 1)
    _import_stack()
    threads = _threads()
    if threads:
        print(f"not ready: threads {threads} started by the imports", file=reply, flush=True)
        return
    import vlmtune

    gc.freeze()  # what the children inherit is never garbage: no collection in them walks it (nor copies its pages)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print(f"ready {Path(vlmtune.__file__).parent}", file=reply, flush=True)
    reply.close()
    sys.stdout.flush()
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            break
        while True:  # reap the waiters that have finished
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if listener in ready:
            conn, _ = listener.accept()
            if os.fork() == 0:
                _waiter(conn, listener)
            conn.close()
    listener.close()
    while True:  # the waiters still running (their commands were killed): reaped, so their CPU time is counted
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


# ---- the client ---------------------------------------------------------------------------------------------------

class _Server:
    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="vlmtune-forkserver-")
        self.path = os.path.join(self.folder, "socket")
        self.env = dict(os.environ)
        self.log = open(os.path.join(self.folder, "server.log"), "w+b")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], cwd=ROOT, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode().split()
        self.vlmtune = Path(line[1]) if line[:1] == ["ready"] else None
        Path(self.folder, "env.json").write_text(json.dumps(self.env))  # what python_main compares with
        self.python = Path(self.folder, "python")  # script_env's stand-in interpreter
        self.python.write_text(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                               "import forkserver\nforkserver.python_main()\n")
        self.python.chmod(0o755)
        if self.vlmtune is None:
            self.log.seek(0)
            warnings.warn(f"the tests' fork server did not start ({' '.join(line)}); commands run as subprocesses:"
                          f"\n{self.log.read().decode(errors='replace')[-3000:]}", stacklevel=3)

    def stop(self) -> None:
        self.proc.stdin.close()  # the server's loop ends on EOF
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)


_server: _Server | None = None
_live: dict[int, Forked] = {}  # commands started and not yet waited for


def _get_server() -> _Server:
    global _server
    if _server is None:
        _server = _Server()
        atexit.register(stop)
    return _server


def stop() -> None:
    """Kill the commands still running, then stop the server (the end of the session)."""
    global _server
    for forked in list(_live.values()):
        forked.kill()
        forked.wait()
    if _server is not None:
        _server.stop()
        _server = None


def _differing_keys(env: dict, server_env: dict) -> set[str]:
    """The keys in which a command's environment differs from the server's. A PATH that is the server's with
    folders appended counts as the same (importing decord in the pytest process appends its library's folder):
    whatever a module found on the PATH at import in the server, it finds first on the longer one too."""
    differ = {key for key in env.keys() | server_env.keys() if env.get(key) != server_env.get(key)}
    if "PATH" in differ and server_env.get("PATH") and env.get("PATH", "").startswith(server_env["PATH"] + os.pathsep):
        differ.discard("PATH")
    return differ


def _request(cmd, cwd, env) -> dict | None:
    """What the server needs to fork ``cmd``, or None where it must run as a real subprocess."""
    cmd = [str(part) for part in cmd]
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    if cmd[1] == "-m" and len(cmd) > 2 and cmd[2] == "vlmtune.cli":
        module, script, args = cmd[2], None, cmd[3:]
        if Path(cwd or os.getcwd()).resolve() != ROOT:  # `-m` imports vlmtune from the working folder
            return None
    elif cmd[1] in SCRIPTS:
        module, script, args = None, cmd[1], cmd[2:]
    else:
        return None
    env = dict(os.environ if env is None else env)
    server = _get_server()
    if server.vlmtune is None or (module and server.vlmtune != ROOT / "vlmtune"):
        return None
    differ = _differing_keys(env, server.env)
    if differ - RUN_TIME_KEYS:
        if os.environ.get(LOG_KEY):
            with open(os.environ[LOG_KEY], "a") as log:
                log.write(f"subprocess (env differs: {sorted(differ - RUN_TIME_KEYS)}) {' '.join(cmd)[:200]}\n")
        return None
    return {"module": module, "script": script, "args": args, "cwd": str(cwd or os.getcwd()), "env": env}


def _decode(data: bytes) -> str:
    """As subprocess does in text mode."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


class Forked:
    """A command forked from the server, with the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, cmd: list, request: dict, stdout: int | None, stderr: int | None, text: bool,
                 path: str | None = None):
        self.args, self.returncode, self._text = cmd, None, text
        self._files, self._buffer = {}, b""
        opened = [os.open(os.devnull, os.O_RDONLY)]
        fds = [opened[0]]
        for name, target in (("stdout", stdout), ("stderr", stderr)):
            if target == subprocess.PIPE:
                self._files[name] = tempfile.TemporaryFile()
                fds.append(self._files[name].fileno())
            elif target == subprocess.STDOUT:
                fds.append(fds[1])
            elif target == subprocess.DEVNULL:
                opened.append(os.open(os.devnull, os.O_WRONLY))
                fds.append(opened[-1])
            else:  # None: this process's own file descriptor, as a subprocess inherits it
                fds.append(1 if name == "stdout" else 2)
        payload = json.dumps(request).encode()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(path or _get_server().path)
            socket.send_fds(self._conn, [_HEADER.pack(len(payload))], fds)
            self._conn.sendall(payload)
        finally:
            for fd in opened:
                os.close(fd)
        self.pid = int(self._readline(None))
        _live[self.pid] = self

    def _readline(self, timeout: float | None) -> bytes:
        """One line of the server's reply (the pid, then the returncode); TimeoutError when none came in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            self._conn.settimeout(None if deadline is None else max(deadline - time.monotonic(), 0.001))
            chunk = self._conn.recv(64)
            if not chunk:
                raise RuntimeError(f"the fork server dropped the command {self.args}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                line = self._readline(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            code, cpu = line.split()
            self.returncode, self.cpu_s = int(code), float(cpu)
            _live.pop(self.pid, None)
            self._conn.close()
            if os.environ.get(LOG_KEY):  # one line per command: its CPU seconds (with all it forked), its argv
                with open(os.environ[LOG_KEY], "a") as log:
                    log.write(f"{self.cpu_s:.2f} {' '.join(map(str, self.args))[:300]}\n")
        return self.returncode

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """SIGKILL (or ``signum``) to the command and everything it forked (its process group)."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass

    def _output(self, name: str):
        file = self._files.get(name)
        if file is None:
            return None
        file.seek(0)
        data = file.read()
        file.close()
        return _decode(data) if self._text else data

    def communicate(self, timeout: float | None = None):
        """Wait (a timeout leaves the command running, as subprocess does), then its captured stdout and stderr."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            raise
        except BaseException:
            self.kill()
            self.wait()
            raise
        return self._output("stdout"), self._output("stderr")


def Popen(cmd, *, cwd=None, env=None, stdout=None, stderr=None, text=False, start_new_session=False, **kwargs):  # noqa: N802
    """``subprocess.Popen``, forked from the server where the command allows it (it always leads its own process
    group there, as with ``start_new_session=True``)."""
    request = None if kwargs else _request(cmd, cwd, env)
    if request is None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text,
                                start_new_session=start_new_session, **kwargs)
    return Forked(cmd, request, stdout, stderr, text)


def run(cmd, *, cwd=None, env=None, capture_output=False, text=False, timeout=None, check=False, **kwargs):
    """``subprocess.run``, forked from the server where the command allows it. On a timeout, or when the waiting
    test is interrupted, the command's whole process group is killed."""
    request = None if kwargs else _request(cmd, cwd, env)
    if request is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
                              check=check, **kwargs)
    pipe = subprocess.PIPE if capture_output else None
    forked = Forked(cmd, request, pipe, pipe, text)
    try:
        forked.wait(timeout)
    except BaseException as exc:
        forked.kill()
        forked.wait()
        out, err = forked._output("stdout"), forked._output("stderr")
        if isinstance(exc, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        raise
    out, err = forked._output("stdout"), forked._output("stderr")
    if check and forked.returncode:
        raise subprocess.CalledProcessError(forked.returncode, cmd, out, err)
    return subprocess.CompletedProcess(cmd, forked.returncode, out, err)


def script_env(env: dict) -> dict:
    """``env`` for ``bash scripts/NAME.sh``, with ``PYTHON`` (the interpreter scripts/launch.sh runs) set to a
    stand-in (``python_main``): the script's ``python -m vlmtune.cli ...`` is then forked from this process's
    server, and its other commands (``python -c ...``) run the real interpreter. ``env`` unchanged where it sets
    ``PYTHON`` itself or the server does not serve this checkout's vlmtune."""
    server = _get_server()
    if "PYTHON" in env or server.vlmtune != ROOT / "vlmtune":
        return env
    return {**env, "PYTHON": str(server.python), "VLMTUNE_FORKSERVER_SOCKET": server.path,
            "VLMTUNE_FORKSERVER_REAL_PYTHON": sys.executable}


def python_main() -> None:
    """The stand-in interpreter of ``script_env`` (run with ``python -S``: nothing imported but the standard
    library): ``-m vlmtune.cli ARGS`` from the repository root, with an environment that differs from the
    server's only in keys read at run time (``RUN_TIME_KEYS``, ``SCRIPT_KEYS``), is forked from the server with
    this process's argv, working folder, environment, stdout and stderr; SIGTERM / SIGINT go on to it, and this
    process exits as it did. Anything else execs the real interpreter, unchanged."""
    real, args = os.environ["VLMTUNE_FORKSERVER_REAL_PYTHON"], sys.argv[1:]
    socket_path = os.environ["VLMTUNE_FORKSERVER_SOCKET"]
    request = None
    if args[:2] == ["-m", "vlmtune.cli"] and Path.cwd().resolve() == ROOT:
        env = dict(os.environ)
        server_env = json.loads(Path(socket_path).with_name("env.json").read_text())
        differ = _differing_keys(env, server_env)
        if differ - RUN_TIME_KEYS - SCRIPT_KEYS:
            if env.get(LOG_KEY):
                with open(env[LOG_KEY], "a") as log:
                    log.write(f"subprocess (env differs: {sorted(differ - RUN_TIME_KEYS - SCRIPT_KEYS)}) "
                              f"{' '.join(args)[:200]}\n")
        else:
            request = {"module": "vlmtune.cli", "script": None, "args": args[2:], "cwd": os.getcwd(), "env": env}
    if request is None:
        os.execv(real, [real, *args])
    forked = Forked([real, *args], request, None, None, False, path=socket_path)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: forked.kill(signum))
    code = forked.wait()
    if code < 0:  # ended by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    serve(sys.argv[1])
