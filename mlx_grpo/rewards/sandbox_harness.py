"""The sandbox's child side: the harness that limits itself, arms the audit hook, runs the code
and the tests, and reports. mlx_grpo/rewards/sandbox.py explains every layer of the defence.

This module runs in the sandboxed interpreter (`python -I -S`), which cannot import this package:
the parent compiles this file and sends its code on stdin. So it imports only the standard library,
and nothing here may depend on the rest of mlx_grpo.
"""

import os, sys

_WRITE_BUDGET = 32
# Imports refused by name (top-level package). Each loads C code that acts without audit events.
_BLOCKED = frozenset({
    "ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_multiprocessing",
    "_posixshmem", "sqlite3", "_sqlite3", "_dbm", "_gdbm", "readline", "_curses",
    "_curses_panel", "_tkinter", "_ssl", "syslog", "ossaudiodev", "_interpreters",
    "_interpchannels", "_interpqueues",
})
_BLOCKED_PREFIXES = ("_test", "_xx")
# Audit events refused outright (see the module docstring of mlx_grpo.rewards.sandbox).
_DENY = frozenset({
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
    "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
    "signal.pthread_kill", "cpython.PyInterpreterState_New", "resource.setrlimit",
    "resource.prlimit", "sys.settrace", "sys.setprofile",
    "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "code.__new__", "marshal.load", "os.chdir", "os.chflags", "os.link", "os.symlink",
    "os.chmod", "os.chown", "os.setxattr", "os.removexattr",
})
_DENY_PREFIXES = ("ctypes.", "socket.", "syslog.", "sqlite3.", "winreg.", "_winapi.", "msvcrt.")
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
# Functions without audit events that reach other processes or the machine.
_REMOVE = {
    "os": ("pidfd_open", "mknod", "mkfifo", "chroot", "setpriority", "nice",
           "sched_setaffinity", "sched_setparam", "sched_setscheduler"),
    "posix": ("pidfd_open", "mknod", "mkfifo", "chroot", "setpriority", "nice",
              "sched_setaffinity", "sched_setparam", "sched_setscheduler"),
    "_signal": ("pidfd_send_signal",),
    "time": ("clock_settime", "clock_settime_ns"),
    # DEBUG_SAVEALL would keep collected cycles in gc.garbage, frames (and their f_back) included.
    "gc": ("set_debug",),
}


def _is_blocked(name):
    # Every part counts: an extension's init function is named after the last part, so
    # "x._posixsubprocess" would load a pristine _posixsubprocess.
    for part in name.split("."):
        if part in _BLOCKED or part.startswith(_BLOCKED_PREFIXES):
            return True
    return False


def _path_rules(cwd, stdlib_roots, data_roots, devices):
    """(normalise, inside, in_stdlib, readable, home): how the hook judges a path.

    Like every rule here, these use only names bound in this function, never module globals or
    builtins, because the code can rebind those (os.path.realpath, builtins.isinstance...)."""
    str_, bytes_, type_ = str, bytes, type
    decode = bytes.decode
    home = (cwd + "/",)
    stdlib = tuple(root + "/" for root in stdlib_roots)
    data = tuple(root + "/" for root in data_roots)

    def normalise(path):
        """Absolute path string, or None when it cannot be judged without running the code's
        own methods (str subclasses, PathLike) or when it has '..' (it may cross a symlink)."""
        kind = type_(path)
        if kind is bytes_:
            path = decode(path, "utf-8", "surrogateescape")
        elif kind is not str_:
            return None
        if not path.startswith("/"):
            path = cwd + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                return None
            if part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path, roots):
        return path is not None and (path + "/").startswith(roots)

    def in_stdlib(path):
        # The interpreter's own site-packages sits inside its stdlib dir: third-party code (and
        # native extensions) there would get past layer 3, so it is out of bounds too.
        if not inside(path, stdlib):
            return False
        path += "/"
        return "/site-packages/" not in path and "/dist-packages/" not in path

    def readable(path):
        return inside(path, home) or in_stdlib(path) or inside(path, data) or path in devices

    return normalise, inside, in_stdlib, readable, home


def _file_rules(normalise, inside, readable, home):
    """(refuse, writable, spend, check_open, check_marshal): opens, writes and bytecode loads."""
    str_, bytes_, int_, type_ = str, bytes, int, type
    join = b"".join
    Permission = PermissionError
    os_open, os_read, os_close, rdonly = os.open, os.read, os.close, os.O_RDONLY
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    budget = [_WRITE_BUDGET]
    last_pyc = [None]

    def refuse(event):
        raise Permission("sandbox: " + event + " is not allowed")

    def writable(event, path, dir_fd=-1):
        if (dir_fd is not None and dir_fd != -1) or not inside(normalise(path), home):
            refuse(event + " outside the sandbox directory")

    def spend(event):
        if budget[0] <= 0:
            refuse(event + " (too many files written)")
        budget[0] -= 1

    def check_open(path, mode, flags):
        if type_(path) is int_:
            return  # an fd the code already holds
        # os.open (mode None) honours a dir_fd the hook cannot see: require an absolute path.
        if mode is None and not ((type_(path) is str_ and path.startswith("/"))
                                 or (type_(path) is bytes_ and path.startswith(b"/"))):
            refuse("os.open with a relative path")
        resolved = normalise(path)
        if type_(flags) is not int_ or flags & write_flags:
            if not inside(resolved, home):
                refuse("writing outside the sandbox directory")
            spend("open for writing")
            return
        if resolved is None or not readable(resolved):
            refuse("reading " + (resolved or "this path"))
        if resolved.endswith(".pyc") and not inside(resolved, home):
            last_pyc[0] = resolved

    def check_marshal(data):
        # The import system unmarshals the .pyc it just opened; anything else could be
        # crafted bytecode, which corrupts memory.
        path, last_pyc[0] = last_pyc[0], None
        if path is not None and type_(data) is bytes_:
            fd = os_open(path, rdonly)
            try:
                chunks = []
                while True:
                    chunk = os_read(fd, 1 << 20)
                    if not chunk:
                        break
                    chunks.append(chunk)
            finally:
                os_close(fd)
            last_pyc[0] = None
            if join(chunks)[16:] == data:
                return
        refuse("marshal.loads of anything but standard-library bytecode")

    return refuse, writable, spend, check_open, check_marshal


def _make_hook(cwd, stdlib_roots, data_roots, devices):
    """The audit hook: one dispatch on the event name over the rules above. It touches only
    names bound here or in the rules, never module globals or builtins."""
    str_, int_, type_ = str, int, type
    Value, Attribute, Import, Runtime = ValueError, AttributeError, ImportError, RuntimeError
    deny, deny_prefixes, frame_attrs = _DENY, _DENY_PREFIXES, _FRAME_ATTRS
    blocked, blocked_prefixes = _BLOCKED, _BLOCKED_PREFIXES
    normalise, inside, in_stdlib, readable, home = _path_rules(cwd, stdlib_roots, data_roots, devices)
    refuse, writable, spend, check_open, check_marshal = _file_rules(normalise, inside, readable, home)

    def hook(event, args):
        if event == "exec" or event == "compile" or event == "builtins.id":
            return  # the hottest events, always allowed
        if event == "open":
            check_open(*args)
        elif event == "import":
            name = args[0]
            if type_(name) is not str_:
                raise Import("sandbox: import of a non-str name")
            for part in name.split("."):  # all parts: see _is_blocked
                if part in blocked or part.startswith(blocked_prefixes):
                    raise Import("sandbox: import of " + name + " is blocked")
            # The event again, with a file, just before dlopen: a shared object runs its
            # constructors on load, so native code may only come from the standard library.
            if args[1] is not None and not in_stdlib(normalise(args[1])):
                raise Import("sandbox: native code for " + name + " must come from the standard library")
        elif event == "marshal.loads":
            check_marshal(args[0])
        elif event == "object.__getattr__":
            if type_(args[1]) is not str_ or args[1] in frame_attrs:
                raise Attribute("sandbox: frame access is not allowed")
        elif event == "sys._getframe":
            # ValueError is what callers (logging, typing, namedtuple) already handle.
            raise Value("sandbox: sys._getframe is not allowed")
        elif event == "socket.__new__":
            if args[1] != 1:  # AF_UNIX, for socketpair(); connect/bind/send are refused below
                refuse("network access")
        elif event == "sys.addaudithook":
            raise Runtime("sandbox: adding audit hooks is not allowed")  # only RuntimeError stops it
        elif event in deny or event.startswith(deny_prefixes):
            refuse(event)
        elif event == "os.mkdir":
            writable(event, args[0], args[2])
            spend(event)
        elif event == "os.remove" or event == "os.rmdir":
            writable(event, args[0], args[1])
        elif event == "os.rename":
            writable(event, args[0], args[2])
            writable(event, args[1], args[3])
        elif event == "os.utime":
            writable(event, args[0], args[3])
        elif event == "os.truncate":
            if type_(args[0]) is not int_:  # an fd must already be open for writing
                writable(event, args[0])
        elif event == "os.listdir" or event == "os.scandir":
            path = args[0]
            if path is not None and type_(path) is not int_:
                resolved = normalise(path)
                if resolved is None or not readable(resolved):
                    refuse("listing " + (resolved or "this path"))

    return hook


def _disarm():
    """Remove what has no audit event. Runs before the hook, so it may use anything."""
    import _imp, _signal, _thread

    def no_threads(*args, **kwargs):
        raise RuntimeError("can't start new thread: threads are disabled in the sandbox")

    def no_signals(*args, **kwargs):
        # Handlers receive the running frame. ValueError is what signal.signal raises off the
        # main thread, so callers such as asyncio.run already cope with it.
        raise ValueError("sandbox: signal handlers are disabled")

    def no_spawn(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is not allowed")

    import functools, types  # types reads tb_frame at import time, so import it while allowed

    original_coroutine = types.coroutine

    @functools.wraps(original_coroutine)
    def coroutine(func):
        # The original rewrites a generator function's code object (code.__new__, refused);
        # handing it a plain function instead takes its generic wrapping path. asyncio needs this.
        if type(func) is types.FunctionType and func.__code__.co_flags & 0x1A0 == 0x20:
            return functools.update_wrapper(original_coroutine(lambda *a, **k: func(*a, **k)), func)
        return original_coroutine(func)

    types.coroutine = coroutine

    # Import every other built-in now: once create_builtin is gone, none can be created.
    for name in sys.builtin_module_names:
        if name not in sys.modules and not _is_blocked(name):
            try:
                __import__(name)
            except Exception:
                pass  # unusable anyway; it just stays unavailable
    import _posixsubprocess  # kept importable (subprocess, asyncio import it) but inert
    _posixsubprocess.fork_exec = no_spawn
    _thread.start_new_thread = _thread.start_new = no_threads
    _signal.signal = no_signals
    for module, names in _REMOVE.items():
        module = sys.modules.get(module)
        for name in names:
            if module is not None and hasattr(module, name):
                delattr(module, name)
    del _imp.create_builtin


def _main():
    import builtins, marshal, resource, _signal

    cpu_s, address_space, file_size = (int(arg) for arg in sys.argv[1:4])
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu_s),
              (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NOFILE, int(sys.argv[4]))]
    if address_space:
        limits.append((resource.RLIMIT_AS, address_space))
    for which, value in limits:
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))  # soft == hard: cannot be raised again
    try:
        # NPROC counts every task of the user (and is not enforced for root), so the only
        # meaningful value is 0: no new processes or threads. Best effort: the hook is the
        # real barrier, and a platform refusing this must not break every run.
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)  # oversized writes raise instead of killing

    # The bootstrap consumed this harness from stdin; the payload follows it.
    code, tests, nonce = marshal.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    result_fd = os.dup(1)  # the private result channel; fd 1 becomes a capped file
    out = os.open("stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.close(out)
    # After the hook goes in, the harness uses only locals: the code can rebind globals/builtins.
    write, exit_, exec_, dict_ = os.write, os._exit, exec, dict
    catch_all, bad_test = BaseException, SyntaxError

    def report(status, bits=""):
        write(result_fd, ("\n" + nonce + " " + status + " " + bits + "\n").encode())
        exit_(0)

    try:
        program = compile(code, "<solution>", "exec")
    except BaseException:
        report("syntax_error")
    checks = []
    for i, test in enumerate(tests):
        try:
            checks.append(compile(test, "<test %d>" % i, "exec"))
        except BaseException:
            checks.append(None)
    cwd = os.getcwd()
    stdlib_roots = {os.path.normpath(p) for p in sys.path if p}  # -S: the standard library only
    stdlib_roots |= {os.path.realpath(p) for p in stdlib_roots}
    devices = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})
    hook = _make_hook(cwd, sorted(stdlib_roots), ["/usr/share/zoneinfo"], devices)
    clean_builtins = dict_(builtins.__dict__)
    _disarm()
    sys.addaudithook(hook)
    del hook, code, tests

    namespace = {"__name__": "solution", "__builtins__": dict_(clean_builtins)}
    try:
        exec_(program, namespace)
    except catch_all:
        report("error")
    bits = []
    for check in checks:
        namespace["__builtins__"] = dict_(clean_builtins)  # undo the code's edits to builtins
        try:
            if check is None:
                raise bad_test
            exec_(check, namespace)
            bits.append("1")
        except catch_all:
            bits.append("0")
    report("ok", "".join(bits))


if __name__ == "__main__":  # the bootstrap execs this module's code as __main__
    _main()
