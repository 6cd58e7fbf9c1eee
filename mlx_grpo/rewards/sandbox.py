"""Run model-written Python against assert-style tests in a throwaway, locked-down process.

Model-generated code is hostile input: it may loop forever, fork-bomb, exhaust memory or disk,
read secrets, phone home, kill the trainer, or forge a passing result. Each `run_python_tests`
call is one short-lived interpreter (~25 ms for a trivial run), defended in layers:

1. Process. `python -I -S -B -u -X utf8` in a new session (so its own process group), cwd = a
   fresh temp dir deleted afterwards, environment reduced to PATH, LANG, HOME and TMPDIR (the
   last two are the temp dir). -I ignores PYTHON* variables; -S leaves site-packages off
   sys.path, so only the standard library is importable (third-party native extensions such
   as numpy or mlx would act below layer 3). stdin is /dev/null once the harness has read its
   payload; stdout/stderr go to files in the temp dir and come back truncated to output_cap.
   No preexec_fn (unsafe in a threaded trainer): the harness limits itself before anything else.
2. Kernel limits, soft = hard so they cannot be raised again: RLIMIT_CPU, RLIMIT_FSIZE (with
   SIGXFSZ ignored, an oversized write raises OSError), RLIMIT_NOFILE, RLIMIT_CORE = 0,
   RLIMIT_NPROC = 0 (best effort) and, on Linux, RLIMIT_AS.
3. An audit hook (PEP 578; it cannot be removed), installed after the harness's setup and
   before any model code. It refuses: creating processes and signalling them; sockets other
   than AF_UNIX socketpairs, and every connect/bind/send/DNS call; ctypes, cffi,
   subinterpreters and the C modules that touch files or processes without audit events
   (sqlite3, dbm, readline, curses, tkinter, ssl, syslog, multiprocessing's C parts, _test*);
   writes, creations, removals, renames and metadata changes outside the temp dir, or more
   than 32 inside it; reads outside the standard library (its site-packages excluded), the
   temp dir, the time-zone database and a few devices (so no /proc/<pid>/environ,
   /proc/self/mem or ~/.ssh); paths with '..' or of odd types (str subclasses), and os.open of
   a relative path (its dir_fd is invisible to the hook); changing rlimits, cwd or audit
   hooks; frame and object introspection (sys._getframe,
   sys._current_frames, tb_frame, gi_frame, cr_frame, ag_frame, gc.get_objects/get_referrers/
   get_referents, settrace, setprofile); crafted bytecode (code.__new__, and marshal.loads of
   anything but the standard library's own .pyc files). What has no audit event is disarmed
   before the hook goes in: threads and signal handlers (a handler is handed the running frame)
   are disabled; _posixsubprocess.fork_exec, pidfd_open, pidfd_send_signal, mknod, mkfifo,
   chroot, the priority setters, clock_settime and gc.set_debug (DEBUG_SAVEALL would hand out
   collected frames) are removed; native modules load only from the standard library's own
   files (a shared object runs code as it loads); and _imp.create_builtin, which would rebuild
   a pristine built-in module without an event, is deleted once every other built-in module
   is imported.
4. An unforgeable result. The parent passes (code, tests, nonce) on stdin. The harness keeps a
   private dup of the stdout pipe, runs the code and then each test on its own (with fresh
   builtins, so rebinding builtins.len does not reach the tests), and last writes one
   `<nonce> <status> <bits>` line there. The nonce lives only in a local of the harness's
   frame, which layer 3 keeps out of reach; the parent believes nothing else, so printing a
   fake result, writing to the pipe, sys.exit, os._exit or crashing all score 0.
5. A parent watchdog: wall-clock timeout, RSS checked every <= 50 ms, and SIGKILL to the whole
   process group after every run, before reaping, so nothing outlives the call.

Linux: all five layers. Running as root (usual in containers), the code runs as root too:
RLIMIT_NPROC is not enforced for root, so the audit hook alone stops fork bombs, reads of root's
files and signals to other processes. There is no network namespace (os.unshare needs Python
3.12); sockets are stopped by the hook.
macOS: the same, except that RLIMIT_AS is not set (macOS does not enforce it), so memory is
bounded only by the RSS watchdog, which can overshoot by what the code allocates in 50 ms.
RLIMIT_NPROC counts processes, not threads, there; threads are disabled by the harness anyway.

Not contained (PEP 578 itself says audit hooks are not a sandbox):
- CPython memory-safety bugs. Code that corrupts the interpreter's memory runs native code
  below layer 3; layers 1, 2 and 5 still hold. There is no seccomp, namespace or separate
  user: against a skilled human attacker, rather than a reward-hacking policy, add a VM or
  container around the trainer.
- Reward hacking within the rules: an object whose __eq__ always returns True, or
  monkeypatching a module the tests call, passes asserts. Only better tests help.
- Reads inside the standard library and the temp dir, metadata probes (os.stat,
  os.path.exists) anywhere, and CPU, memory and disk use up to the limits.
What sandboxed code cannot do, by design: threads, signal handlers, subprocesses, sockets,
third-party packages, chmod/chown, traceback formatting (it needs tb_frame), and logging's
caller lookup (it degrades to "(unknown file)").
"""

from __future__ import annotations

import functools
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# Statuses of a SandboxResult. Only "ok" means the tests ran; its `passed` may still be < total.
OK = "ok"
SYNTAX_ERROR = "syntax_error"  # the code does not compile
ERROR = "error"  # the code raised (SystemExit included) before the tests ran
TIMEOUT = "timeout"  # wall-clock limit
MEMORY = "memory"  # RSS watchdog
KILLED = "killed"  # died from a signal: CPU limit, crash
NO_RESULT = "no_result"  # exited without a valid report (os._exit, a forged line, a crash)

_MB = 1024 * 1024
_POLL_MAX_S = 0.05
_REPORT_CAP = 1 << 20  # bytes of the result pipe the parent reads
# Linux only: macOS does not enforce RLIMIT_AS. Tests flip it to exercise the RSS watchdog.
_USE_RLIMIT_AS = sys.platform.startswith("linux")



# The harness (sandbox_harness.py) travels precompiled on stdin (compiling its source costs ~5 ms a run); the
# bootstrap execs it. Both ends are the same interpreter, so marshal's format matches.
_BOOTSTRAP = "import marshal, sys; exec(marshal.load(sys.stdin.buffer))"


@functools.lru_cache(maxsize=1)
def _harness_bytes() -> bytes:
    # The child (-I -S) cannot import this package: it gets the harness module's code instead.
    source = Path(__file__).with_name("sandbox_harness.py").read_text(encoding="utf-8")
    return marshal.dumps(compile(source, "<sandbox harness>", "exec"))


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did. `tests[i]` is whether test i passed (all False unless "ok")."""

    status: str
    passed: int
    total: int
    tests: tuple[bool, ...]
    stdout: str
    stderr: str
    duration_s: float
    returncode: int | None


def run_python_tests(
    code: str,
    tests: list[str],
    *,
    timeout_s: float = 5.0,
    cpu_s: float | None = None,
    memory_mb: float = 512,
    max_file_mb: float = 16,
    max_open_files: int = 64,
    output_cap: int = 8192,
) -> SandboxResult:
    """Run `code`, then each statement in `tests` (e.g. "assert f(2) == 4") in its namespace.

    A test passes if it runs without raising. Safe to call from several threads at once.
    cpu_s defaults to timeout_s rounded up plus one, so the wall clock normally fires first.
    stdout/stderr are the code's output, truncated to output_cap bytes each.
    """
    tests = list(tests)
    cpu = math.ceil(timeout_s) + 1 if cpu_s is None else max(1, math.ceil(cpu_s))
    memory = int(memory_mb * _MB)
    limits = [str(cpu), str(memory if _USE_RLIMIT_AS else 0), str(int(max_file_mb * _MB)),
              str(int(max_open_files))]
    nonce = secrets.token_hex(16)
    payload = _harness_bytes() + marshal.dumps((code, tests, nonce))
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="mlx_grpo_sandbox_"))
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    start = time.monotonic()
    proc = feeder = None
    killed = False
    try:
        err_path = os.path.join(workdir, "stderr.txt")
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8", "-c", _BOOTSTRAP, *limits],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=workdir, env=env,
                start_new_session=True, close_fds=True,
            )
        feeder = _send(proc, payload)
        status, channel = _watch(proc, start + timeout_s, memory)
        _kill_group(proc)  # before reaping, so the group id cannot have been reused
        killed = True
        returncode = proc.wait()
        duration = time.monotonic() - start
        _drain(proc.stdout.fileno(), channel)  # whatever _watch left: it may stop at the exit
        report = _parse_report(b"".join(channel), nonce)
        stdout = _read_capped(os.path.join(workdir, "stdout.txt"), output_cap)
        stderr = _read_capped(err_path, output_cap)
    finally:
        if proc is not None:
            if not killed:
                _kill_group(proc)
            proc.wait()
            if feeder is not None:
                feeder.join(5.0)  # its write fails once the child is dead
            if feeder is None or not feeder.is_alive():
                _close_quietly(proc.stdin)  # else leak it: closing under a blocked write races fd reuse
            _close_quietly(proc.stdout)
        shutil.rmtree(workdir, ignore_errors=True)

    # Only the nonce line is trusted; it is written last, so it wins over a slow exit.
    results = (False,) * len(tests)
    if report is not None and report[0] == OK and len(report[1]) == len(tests):
        status, results = OK, tuple(bit == "1" for bit in report[1])
    elif report is not None and report[0] in (SYNTAX_ERROR, ERROR):
        status = report[0]
    elif status is None:
        status = KILLED if returncode < 0 else NO_RESULT
    return SandboxResult(status, sum(results), len(tests), results, stdout, stderr, duration, returncode)


def _send(proc: subprocess.Popen, payload: bytes) -> threading.Thread:
    """Write the payload to the child's stdin, then close it, from a thread: the payload (the
    ~18 KB harness first) may not fit the pipe, and a child that never reads must not block the
    caller past its timeout. The thread ends once the child reads or dies; join it after the kill."""

    def feed():
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except (OSError, ValueError):
            pass  # the child died or was killed; the watchdog reports why

    thread = threading.Thread(target=feed, name="sandbox-feed", daemon=True)
    thread.start()
    return thread


def _watch(proc: subprocess.Popen, deadline: float, memory_bytes: int) -> tuple[str | None, list[bytes]]:
    """Wait for the child to finish (left unreaped), collecting what it writes on the result pipe.

    Returns (TIMEOUT, MEMORY or NO_RESULT if it had to be stopped, else None; the chunks read).
    The pipe reaching EOF means the child closed its result fd, normally by exiting: wake then.
    """
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    chunks = []
    try:
        child = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        child = None
    delay = 0.002
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            eof = _drain(fd, chunks)
            size = sum(map(len, chunks))
            if child is None:
                return None, chunks
            if eof:  # normally the exit itself; else the code closed the channel and runs on
                return (None if _exits_soon(child) else NO_RESULT), chunks
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    return None, chunks
                if child.memory_info().rss > memory_bytes:
                    return MEMORY, chunks
            except psutil.NoSuchProcess:
                return None, chunks
            except psutil.AccessDenied:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return TIMEOUT, chunks
            if size >= _REPORT_CAP:  # flooded: stop reading, just wait
                time.sleep(min(delay, remaining))
            else:
                selector.select(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX_S)


def _drain(fd: int, chunks: list[bytes]) -> bool:
    """Append what the non-blocking pipe holds now (up to _REPORT_CAP in all); True at EOF."""
    size = sum(map(len, chunks))
    while size < _REPORT_CAP:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        chunks.append(chunk)
        size += len(chunk)
    return False


def _exits_soon(child: psutil.Process, grace_s: float = 0.2) -> bool:
    deadline = time.monotonic() + grace_s
    while True:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child is its session's (and group's) leader
    except (ProcessLookupError, PermissionError):
        pass


def _parse_report(data: bytes, nonce: str) -> tuple[str, str] | None:
    """(status, bits) from the line that carries the nonce; None if there is no valid one."""
    prefix = nonce.encode() + b" "
    for line in data.split(b"\n"):
        if line.startswith(prefix):
            fields = line[len(prefix):].decode("ascii", "replace").split(" ")
            bits = fields[1] if len(fields) > 1 else ""
            if len(fields) <= 2 and set(bits) <= {"0", "1"}:
                return fields[0], bits
    return None


def _read_capped(path: str, cap: int) -> str:
    """At most `cap` bytes of a regular file the code may have tampered with."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        data = os.read(fd, cap) if cap > 0 else b""
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace")
    if info.st_size > cap:
        text += f"\n[... truncated: {info.st_size} bytes in all]"
    return text


def _close_quietly(pipe) -> None:
    try:
        if pipe is not None:
            pipe.close()
    except OSError:
        pass
