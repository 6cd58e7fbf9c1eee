"""The code sandbox: hostile snippets are contained, score 0 and leave nothing behind."""

import os
import socket
import tempfile
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards import CHECKS, sandbox
from mlx_grpo.rewards.code_checks import extract_code, python_tests
from mlx_grpo.rewards.sandbox import run_python_tests

SQUARE = "def f(x):\n    return x * x\n"
SQUARE_TESTS = ["assert f(2) == 4", "assert f(3) == 9", "assert f(-1) == 1", "assert f(0) == 0"]
SAMPLE = {"prompt": "square", "tests": SQUARE_TESTS, "entry_point": "f"}


def fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}```\n"


def run(code: str, tests=("assert True",), **kwargs):
    return run_python_tests(textwrap.dedent(code), list(tests), **kwargs)


def first_int(text: str) -> int:
    return int(text.split()[0])


def session_members(sid: int) -> list[int]:
    members = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                members.append(pid)
        except OSError:
            pass
    return members


def processes_with(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or ()):
            found.append(proc.pid)
    return found


def assert_gone(pid: int) -> None:
    """The sandbox process is dead and reaped, and nothing else is left in its session."""
    assert not psutil.pid_exists(pid)
    assert session_members(pid) == []


@pytest.fixture(autouse=True)
def no_leftover_children():
    # Only processes the test started count (e.g. W&B's service from an earlier test may live on).
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    assert [p for p in psutil.Process().children(recursive=True) if p.pid not in before] == []


# --- scoring -------------------------------------------------------------------------------------

def test_correct_solution_scores_one():
    assert python_tests(fenced(SQUARE), SAMPLE) == 1.0
    result = run(SQUARE, SQUARE_TESTS)
    assert (result.status, result.passed, result.total, result.tests) == ("ok", 4, 4, (True,) * 4)


def test_half_passing_scores_half_and_all_or_nothing_scores_zero():
    half = "def f(x):\n    return x * x if x > 1 else 42\n"
    assert python_tests(fenced(half), SAMPLE) == 0.5
    assert python_tests(fenced(half), SAMPLE, partial_credit=False) == 0.0
    assert python_tests(fenced(SQUARE), SAMPLE, partial_credit=False) == 1.0
    assert run(half, SQUARE_TESTS).tests == (True, True, False, False)


def test_each_test_runs_separately():
    result = run(SQUARE, ["assert f(2) == 5", "raise SystemExit(0)", "assert f(3) == 9", "import sys; sys.exit()"])
    assert result.tests == (False, False, True, False)


def test_syntax_error_and_raising_code_score_zero():
    assert python_tests(fenced("def f(x) return x\n"), SAMPLE) == 0.0
    assert run("def f(x) return x").status == "syntax_error"
    crashing = SQUARE + "raise RuntimeError('boom')\n"  # f is defined, but the program crashed
    assert python_tests(fenced(crashing), SAMPLE) == 0.0
    assert run(crashing, SQUARE_TESTS).status == "error"


def test_stdlib_imports_work():
    code = """
        import math, collections, itertools, functools, re, heapq, typing, dataclasses, json, bisect
        from fractions import Fraction

        @functools.lru_cache(maxsize=None)
        def f(n):
            counts = collections.Counter(re.findall(r"[a-z]", "hello"))
            pairs = list(itertools.combinations(range(n), 2))
            return math.isqrt(n * n) + len(pairs) + counts["l"] + heapq.nsmallest(1, [n])[0] * 0
    """
    result = run(code, ["assert f(4) == 4 + 6 + 2", "assert json.loads('[1]') == [1]",
                        "assert Fraction(1, 2) * 2 == 1", "assert bisect.bisect([1, 3], 2) == 1"])
    assert (result.status, result.passed) == ("ok", 4), result.stderr


def test_builtins_edits_do_not_leak_into_tests():
    # Rebinding builtins (a cheap reward hack) does not reach the tests: each gets fresh builtins.
    code = "import builtins\nbuiltins.len = lambda x: 3\n__builtins__['len'] = lambda x: 3\n"
    assert run(code, ["assert len([1]) == 1"]).tests == (True,)


def test_output_is_captured():
    result = run("import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)")
    assert result.stdout == "to stdout\n" and result.stderr == "to stderr\n"


# --- limits --------------------------------------------------------------------------------------

def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run("import os\nprint(os.getpid())\nwhile True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and result.passed == 0
    assert 1.0 <= time.monotonic() - start < 3.0
    assert_gone(first_int(result.stdout))
    assert python_tests(fenced("def f(x):\n    while True:\n        pass\n"), SAMPLE, timeout_s=1.0) == 0.0


def test_cpu_limit_kills_a_busy_loop():
    result = run("while True:\n    pass\n", timeout_s=10.0, cpu_s=1)
    assert result.status == "killed" and result.duration_s < 9.0


def test_fork_bomb_is_contained():
    before = len(psutil.pids())
    result = run("""
        import os
        print(os.getpid(), flush=True)
        while True:
            try:
                os.fork()
            except Exception:
                pass
    """, timeout_s=1.0)
    assert result.status == "timeout"
    assert_gone(first_int(result.stdout))
    assert len(psutil.pids()) <= before + 5
    bomb = "import os\ndef f(x):\n    while True:\n        os.fork()\n"
    assert python_tests(fenced(bomb), SAMPLE, timeout_s=1.0) == 0.0


@pytest.mark.parametrize("hog", [
    # Linux refuses the allocation (RLIMIT_AS). On macOS it is lazy, so touch a byte per page to
    # make it real memory for the RSS watchdog.
    "b = bytearray(10 * 1024 ** 3)\nb[::4096] = bytes(len(range(0, len(b), 4096)))",
    "a = []\nwhile True:\n    a.append(b'x' * 10 ** 7)",
])
def test_memory_bomb_is_contained(hog):
    result = run(hog + "\n", memory_mb=256, timeout_s=10.0)
    assert result.status in ("error", "memory") and result.passed == 0
    assert python_tests(fenced(SQUARE + hog + "\n"), SAMPLE, memory_mb=256) == 0.0


def test_rss_watchdog_kills_without_rlimit_as(monkeypatch):
    # macOS ignores RLIMIT_AS; there the parent's RSS watchdog is the memory limit.
    monkeypatch.setattr(sandbox, "_USE_RLIMIT_AS", False)
    result = run("a = []\nwhile True:\n    a.append(b'x' * 10 ** 7)\n", memory_mb=200, timeout_s=10.0)
    assert result.status == "memory" and result.duration_s < 5.0


def test_huge_file_is_capped():
    result = run("""
        import os
        try:
            with open("big.bin", "wb") as out:
                for _ in range(100):
                    out.write(b"x" * 2 ** 20)
        except OSError as e:
            print("refused", e.errno)
        print(os.path.getsize("big.bin"))
    """, ["assert os.path.getsize('big.bin') > 50 * 2 ** 20"], max_file_mb=4)
    refused, size = result.stdout.splitlines()
    assert refused.startswith("refused") and int(size) <= 4 * 2 ** 20
    assert result.tests == (False,)


def test_stdout_flood_is_capped():
    parent_rss = psutil.Process().memory_info().rss
    result = run("chunk = 'x' * 10 ** 6\nfor _ in range(100):\n    print(chunk)\n", output_cap=1000)
    assert len(result.stdout) < 1100 and "truncated" in result.stdout
    assert result.status == "error"  # the 16 MB file cap stopped the printing
    assert psutil.Process().memory_info().rss - parent_rss < 50 * 2 ** 20


def test_writes_outside_the_temp_dir_are_refused():
    probe = os.path.join(tempfile.gettempdir(), f"sandbox-probe-{uuid.uuid4().hex}")
    attempts = [
        f"open({probe + '-1'!r}, 'w').write('x')",
        f"os.close(os.open({probe + '-2'!r}, os.O_WRONLY | os.O_CREAT))",
        f"import pathlib; pathlib.Path({probe + '-3'!r}).write_text('x')",
        f"open('../' + {os.path.basename(probe) + '-4'!r}, 'w')",
        f"open('a', 'w').close(); os.rename('a', {probe + '-5'!r})",
        f"import shutil; shutil.copy('/etc/hostname', {probe + '-6'!r})",
        f"os.symlink({probe + '-7'!r}, 'link'); open('link', 'w')",
        f"os.mkdir({probe + '-8'!r})",
    ]
    code = "import os\ndef attempt(src):\n    try:\n        exec(src)\n        return True\n    except Exception:\n        return False\n"
    result = run(code, [f"assert attempt({src!r})" for src in attempts])
    assert result.status == "ok" and result.tests == (False,) * len(attempts)
    assert [n for n in range(1, 9) if os.path.exists(f"{probe}-{n}")] == []


def test_temp_dir_is_private_and_deleted():
    result = run("import os\nprint(os.getcwd())\nprint(os.environ['HOME'])\nopen('x.txt', 'w').write('x')\n")
    cwd, home = result.stdout.split()
    assert cwd == home and os.path.basename(cwd).startswith("mlx_grpo_sandbox_")
    assert not os.path.exists(cwd)


# --- secrets, processes, network -----------------------------------------------------------------

def test_environment_secrets_do_not_reach_the_code(monkeypatch):
    secret = "sk-test-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    result = run("""
        import os, sys
        print(dict(os.environ))
        for path in (f"/proc/{os.getppid()}/environ", "/proc/self/environ"):
            try:
                print(open(path, "rb").read())
            except OSError as e:
                print("refused", path, file=sys.stderr)
    """, ["assert os.environ['OPENAI_API_KEY'].startswith('sk-')"])
    assert result.tests == (False,)
    assert secret not in result.stdout + result.stderr
    assert "OPENAI_API_KEY" not in result.stdout and "refused /proc/" in result.stderr
    leak = "import os\ndef f(x):\n    return x * x if 'OPENAI_API_KEY' in os.environ else 0\n"
    assert python_tests(fenced(leak), SAMPLE) == 0.25  # only f(0) == 0 passes


def test_spawned_processes_do_not_survive():
    marker = f"sandbox-marker-{uuid.uuid4().hex}"
    result = run(f"""
        import os, sys, time
        print(os.getpid(), flush=True)
        spawned = []
        def attempt(name, fn):
            try:
                fn()
                spawned.append(name)
            except BaseException as e:
                print(name, "refused:", type(e).__name__, file=sys.stderr)
        def daemon():
            child = os.fork()
            if child == 0:  # a new session, out of reach of the process-group kill
                os.setsid()
                time.sleep(30)
                os._exit(0)
            print("daemon", child, flush=True)
        import subprocess
        attempt("popen", lambda: subprocess.Popen(["/bin/sh", "-c", "sleep 30 # {marker}"], start_new_session=True))
        attempt("fork", daemon)
        attempt("system", lambda: os.system("sleep 30 & # {marker}"))
        attempt("posix_spawn", lambda: os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "sleep 30 # {marker}"], {{}}))
        attempt("spawnv", lambda: os.spawnv(os.P_NOWAIT, "/bin/sh", ["/bin/sh", "-c", "sleep 30 # {marker}"]))
        attempt("pty", lambda: __import__("pty").spawn(["/bin/sh", "-c", "sleep 30 # {marker}"]))
        attempt("multiprocessing", lambda: __import__("multiprocessing").Process(target=print).start())
        attempt("thread", lambda: __import__("threading").Thread(target=print).start())
        print(spawned)
    """, ["assert spawned"])
    pid = first_int(result.stdout)
    assert processes_with(marker) == []
    assert_gone(pid)
    daemons = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("daemon")]
    assert [d for d in daemons if psutil.pid_exists(d)] == []
    assert result.stdout.splitlines()[-1] == "[]" and result.tests == (False,)
    assert result.stderr.count("refused") == 8


def test_network_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result = run(f"""
            import socket
            connected = []
            for attempt in (
                lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1),
                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port})),
                lambda: socket.getaddrinfo("localhost", {port}),
                lambda: socket.socket(socket.AF_UNIX).connect("/var/run/docker.sock"),
            ):
                try:
                    attempt()
                    connected.append(True)
                except OSError:
                    pass
        """, ["assert connected"])
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()
    assert result.status == "ok" and result.tests == (False,)


# --- forging the result --------------------------------------------------------------------------

NONCE_THIEF = """
import gc, os, sys
def scan(frame):
    # If any frame of the harness were reachable, its nonce (32 hex chars) would forge a pass.
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, str) and len(value) == 32:
                os.write(3, ("\\n" + value + " ok 1\\n").encode())
        frame = frame.f_back
def cycle():
    try:
        raise ValueError
    except ValueError as e:
        keep = e  # frame -> keep -> exception -> traceback -> frame
def from_garbage():
    gc.set_debug(gc.DEBUG_SAVEALL)
    cycle()
    gc.collect()
    return [o for o in gc.garbage if type(o).__name__ == "frame"][0]
def steal():
    grabs = (lambda: sys._getframe(), lambda: list(sys._current_frames().values())[0],
             lambda: [o for o in gc.get_objects() if type(o).__name__ == "frame"][0],
             from_garbage, lambda: 1 / 0)
    for grab in grabs:
        try:
            scan(grab())
        except BaseException as e:
            try:
                scan(e.__traceback__.tb_frame)
            except BaseException:
                pass
try:
    import signal
    signal.signal(signal.SIGALRM, lambda signum, frame: scan(frame))
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
except BaseException:
    pass
steal()
def f(x):
    steal()
    for _ in range(10 ** 6):  # give the timer time to fire inside the test
        pass
"""


@pytest.mark.parametrize("code, status", [
    ("print('0' * 32 + ' ok 1')\nimport os\nos._exit(0)\n", "no_result"),
    ("import os\nos.write(3, b'\\n' + b'a' * 32 + b' ok 1\\n')\nos._exit(0)\n", "no_result"),
    ("import sys\nsys.exit(0)\n", "error"),
    ("raise SystemExit(0)\n", "error"),
    ("import os\nos.close(3)\ndef f(x):\n    return 2\n", "no_result"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "error"),  # os.kill is refused
    ("import faulthandler\nfaulthandler._sigsegv()\n", "killed"),
    (NONCE_THIEF, "ok"),
])
def test_forged_results_score_zero(code, status):
    sample = {"tests": ["assert f(1) == 2"], "entry_point": "f"}
    assert python_tests(fenced(code), sample) == 0.0
    assert run(code, sample["tests"]).status == status


def test_audit_hook_refusals():
    attempts = {
        "fork": "os.fork()",
        "forkpty": "os.forkpty()",
        "exec": "os.execv('/bin/true', ['true'])",
        "kill": "os.kill(os.getppid(), 0)",
        "killpg": "os.killpg(os.getpgid(os.getppid()), 0)",
        "pidfd": "os.pidfd_open(os.getppid())",
        "fork_exec": "import _posixsubprocess; _posixsubprocess.fork_exec()",
        "native_from_tmp": "import importlib.util as u, importlib.machinery as m, shutil, _json\n"
                           "shutil.copyfile(_json.__file__, 'copy' + m.EXTENSION_SUFFIXES[0])\n"
                           "u.module_from_spec(u.spec_from_file_location('x._json', 'copy' + m.EXTENSION_SUFFIXES[0]))",
        "site_packages": "os.listdir(os.path.join(os.path.dirname(os.__file__), 'site-packages'))",
        "ctypes": "import ctypes",
        "_ctypes": "import _ctypes",
        "create_builtin": "import _imp; _imp.create_builtin",
        "reload_fork_exec": "import importlib.util as u, _posixsubprocess as p\n"
                            "u.module_from_spec(u.spec_from_file_location('x._posixsubprocess', p.__file__))",
        "subinterpreter": "import _xxsubinterpreters",
        "sqlite": "import sqlite3",
        "socket": "import socket; socket.socket()",
        "read_root_home": "os.listdir('/root')",
        "read_proc_mem": "open('/proc/self/mem', 'rb')",
        "read_dotdot": "open('/dev/fd/../mem', 'rb')",
        "getframe": "sys._getframe()",
        "current_frames": "sys._current_frames()",
        "tb_frame": "try:\n    1 / 0\nexcept Exception as e:\n    e.__traceback__.tb_frame",
        "gi_frame": "g = (i for i in ()); g.gi_frame",
        "tb_frame_descriptor": "try:\n    1 / 0\nexcept Exception as e:\n"
                               "    type(e.__traceback__).__dict__['tb_frame'].__get__(e.__traceback__)",
        "gi_frame_descriptor": "g = (i for i in ()); type(g).__dict__['gi_frame'].__get__(g)",
        "gc_save_all": "import gc; gc.set_debug(gc.DEBUG_SAVEALL)",
        "gc_objects": "import gc; gc.get_objects()",
        "gc_referrers": "import gc; gc.get_referrers(os)",
        "settrace": "sys.settrace(lambda *a: None)",
        "setprofile": "sys.setprofile(lambda *a: None)",
        "signal": "import signal; signal.signal(signal.SIGALRM, lambda *a: None)",
        "thread": "import _thread; _thread.start_new_thread(print, ())",
        "setrlimit": "import resource; resource.setrlimit(resource.RLIMIT_CPU, (99, 99))",
        "code_new": "(lambda: 0).__code__.replace(co_consts=())",
        "marshal": "import marshal; marshal.loads(marshal.dumps(1))",
        "mknod": "os.mknod('node')",
        "chdir": "os.chdir('/')",
        "chmod": "os.chmod('.', 0o777)",
        "link": "os.link('/etc/hostname', 'hard')",
        "clock": "import time; time.clock_settime(time.CLOCK_REALTIME, 0)",
        "write_budget": "[open(f'f{i}', 'w').close() for i in range(100)]",
    }
    # Refused means the sandbox said so, or the function was removed (AttributeError); a
    # NameError or TypeError from a broken probe does not count.
    code = """
        import os, sys
        def refused(src):
            try:
                exec(src, {'os': os, 'sys': sys})
            except BaseException as e:
                if isinstance(e, AttributeError) or "sandbox" in str(e):
                    return True
                print('wrong error:', src, repr(e))
                return False
            print('not refused:', src)
            return False
    """
    result = run(code, [f"assert refused({src!r})" for src in attempts.values()])
    assert result.status == "ok"
    assert [name for name, ok in zip(attempts, result.tests) if not ok] == [], result.stdout + result.stderr


def test_audit_hooks_cannot_be_added():
    code = """
        import sys
        seen = []
        sys.addaudithook(lambda event, args: seen.append(event))
        import colorsys
    """
    assert run(code, ["assert not seen"]).tests == (True,)


def test_allowed_operations_still_work():
    allowed = [
        "import asyncio\nasync def g():\n    return 3\nassert asyncio.run(g()) == 3",
        "import collections\nP = collections.namedtuple('P', 'x')\nassert P(1).x == 1",
        "import logging\nlogging.getLogger('t').warning('hi')",
        "import tempfile\nwith tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')",
        "os.makedirs('a/b')\nopen('a/b/c', 'w').write('x')\nassert open('a/b/c').read() == 'x'\nos.remove('a/b/c')",
        "import inspect, json\nassert 'def loads' in inspect.getsource(json)",
        "import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'",
        "import subprocess, typing, dataclasses, unittest, enum, zoneinfo",
        "try:\n    input()\nexcept EOFError:\n    pass",
    ]
    code = "import os, sys\ndef works(src):\n    try:\n        exec(src, {'os': os})\n    except BaseException as e:\n        print(repr(src), repr(e))\n        return False\n    return True\n"
    result = run(code, [f"assert works({src!r})" for src in allowed])
    assert result.passed == len(allowed), result.stdout


# --- extraction and the check's contract ---------------------------------------------------------

@pytest.mark.parametrize("completion, entry_point, expected", [
    ("```python\nx = 1\n```", None, "x = 1"),
    ("```py\nx = 1\n```", None, "x = 1"),
    ("```\nx = 1\n```", None, "x = 1"),
    ("text\n```bash\nls\n```\n```python\nx = 1\n```\nmore text", None, "x = 1"),
    ("```python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```", None, "def f():\n    return 1"),
    ("```python\ndef g():\n    pass\n```\n```python\ndef f(x):\n    return x\n```\n```python\nf(1)\n```", "f",
     "def f(x):\n    return x"),
    ("Draft:\n```python\ndef f(x):\n    return 0\n```\nFixed:\n```python\ndef f(x):\n    return x\n```", "f",
     "def f(x):\n    return x"),
    ("  ```python\n  def f():\n      pass\n  ```", None, "def f():\n    pass"),
    ("```python\ndef f(x):\n    return x", "f", "def f(x):\n    return x"),  # cut off at max tokens
    ("def f(x):\n    return x\n", "f", "def f(x):\n    return x"),
    ("The answer is to square it.", None, None),
    ("", None, None),
    ("   \n ", None, None),
    ("```json\n{}\n```", None, None),
    ("\x00\x01", None, None),
])
def test_extract_code(completion, entry_point, expected):
    assert extract_code(completion, entry_point) == expected


@pytest.mark.parametrize("completion", ["", " ", "\x00", "🙂" * 50, "```", "```python", "```" * 10_000,
                                        "x" * 1_000_000, "(" * 5000, "<answer>12</answer>"])
def test_python_tests_never_raises_on_weird_text(completion):
    assert python_tests(completion, SAMPLE) == 0.0


@pytest.mark.parametrize("sample", [{}, {"tests": []}, {"tests": "assert True"}, {"tests": [1]}, None])
def test_missing_tests_is_a_dataset_error(sample):
    with pytest.raises(UserInputError, match="python_tests needs each dataset row to have 'tests'"):
        python_tests(fenced(SQUARE), sample)


def test_invalid_params_and_tests_are_user_errors():
    with pytest.raises(UserInputError, match="not valid Python"):
        python_tests(fenced(SQUARE), {"tests": ["assert f(2) =="]})
    with pytest.raises(UserInputError, match="timeout_s"):
        python_tests(fenced(SQUARE), SAMPLE, timeout_s=0)
    with pytest.raises(UserInputError, match="memory_mb"):
        python_tests(fenced(SQUARE), SAMPLE, memory_mb=1)


def test_registered_as_a_check():
    assert CHECKS["python_tests"] is python_tests


def test_report_written_as_the_watcher_looks_away_is_kept(monkeypatch):
    # The child writes its report and exits between the parent's read of the pipe and its
    # zombie check; the report must still be read.
    real_status = psutil.Process.status

    def slow_status(self):
        time.sleep(0.3)
        return real_status(self)

    monkeypatch.setattr(psutil.Process, "status", slow_status)
    result = run(SQUARE, SQUARE_TESTS)
    assert (result.status, result.passed) == ("ok", 4)


def test_concurrent_runs_are_independent():
    def job(n):
        code = f"def f(x):\n    return x + {n}\n"
        tests = [f"assert f(0) == {n}", f"assert f(1) == {n + 1}", "assert f(0) == -1"]
        return n, run(code, tests), python_tests(fenced(code), {"tests": tests[:2], "entry_point": "f"})

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(job, range(8)))
    for n, result, score in outcomes:
        assert (result.status, result.tests, score) == ("ok", (True, True, False), 1.0), n
