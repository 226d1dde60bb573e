"""The program that runs inside the sandbox of `PythonTestsVerifier`: ``python -I sandbox_runner.py`` (stdlib only).

It reads one job (JSON, written by `sd_plugin.sandbox`) from stdin, builds the sandbox (private file-system view,
limits, drop of root and of every capability; not dumpable, so no other process of its uid can open its file
descriptors through /proc or ptrace it), plays the job's role and writes its result (JSON lines) to stdout, the
only way back to the trainer. Roles:

- ``solution``: a forked *worker* runs the model's code, then only answers calls that come on a pipe from the
  harness (``["call", name, args, kwargs]``), with ``["return", value]``, ``["raised", type, message]`` or
  ``["unsendable", why]``. The runner itself never runs model code; it reports how the worker ended.
- ``harness``: runs the tests (the dataset's code, never the model's) in this process, against `Remote` proxies of
  the solution's functions, and holds the verdicts. Another process in another sandbox: nothing the model's code
  does reaches its memory, its builtins or its frames; what comes back from a call is decoded by `decode` into
  fresh objects of exact built-in types, so an ``__eq__`` or a subclass of the model's never takes part.
- ``program``: one forked worker per stdin/stdout test runs the code as ``__main__`` with the test's input on fd 0
  and its fd 1 captured. The expected outputs never enter this process (the trainer compares).

Values cross as plain data only (`encode` / `decode`: None, bool, int, float, str, bytes, list, tuple, dict, set;
JSON with type tags, never pickle): a subclass or any other object is refused on both sides.
"""

import base64
import builtins
import importlib
import json
import keyword
import os
import re
import resource
import select
import signal
import sys
import threading
import time

PLAIN_TYPES = "None, bool, int, float, str, bytes, list, tuple, dict, set"
MAX_DEPTH = 100  # nesting levels of one value
MAX_MESSAGE = 16 << 20  # bytes of one message between the harness and the solution
VALUE_BUDGET = 10000  # values (elements included) of one global of the solution that the tests can read
MAX_OUTPUT = 64 << 20  # bytes of stdout of all runs of one program together (the trainer holds them at once)
# Standard-library modules the harness does not import for the tests: they act on import (print, open a browser).
NOT_IMPORTED = ("this", "antigravity", "idlelib", "turtle", "turtledemo", "tkinter", "webbrowser")
STOPPED = "Stopped the sandbox"  # the solution's process ended; the trainer adds how
# Directories replaced by an empty tmpfs in the private view: homes (token files, ssh keys, caches), shared
# temp dirs (AF_UNIX sockets, other jobs' files) and /run (daemon sockets, container secrets).
MASKED_DIRS = ("/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run", "/mnt", "/media", "/srv")
WRITABLE_DIRS = ("/tmp", "/dev/shm")  # writable, size-limited; everything else is read-only
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
               "nodiratime": 2048, "relatime": 1 << 21}
CAP_DAC_READ_SEARCH = 2


def describe(exc):
    try:
        text = type(exc).__name__ + (": " + str(exc) if str(exc) else "")
        return text[:1000] if isinstance(text, str) else "an exception"
    except BaseException:  # noqa: BLE001 - model code controls __str__
        return type(exc).__name__ if isinstance(type(exc).__name__, str) else "an exception"


def libc_call(libc, name, *args):
    import ctypes

    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "%s%r: %s" % (name, args[:2], os.strerror(errno)))


# ------------------------------------------------------------------------------ sandbox setup (runner, trusted)
def interpreter_paths():
    """Where this interpreter loads code from, as Python names it and resolved (both must exist in the view)."""
    candidates = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *sys.path]
    paths = set()
    for path in candidates:
        if path and os.path.exists(path):
            paths.update((os.path.abspath(path), os.path.realpath(path)))
    return paths


def make_private_view(libc, tmp_mb):
    """Empty tmpfs over `MASKED_DIRS`, the interpreter bound back read-only, every other mount read-only.

    Runs in a fresh mount namespace (``unshare -m``) with CAP_SYS_ADMIN there (root, or ``unshare -r``).
    """
    import ctypes

    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

    def mount(source, target, fstype, flags, data=None):
        encode = lambda s: s.encode() if s is not None else None  # noqa: E731
        libc_call(libc, "mount", encode(source), encode(target), encode(fstype), flags, encode(data))

    mount(None, "/", None, MS_REC | MS_PRIVATE)
    masked = [d for d in MASKED_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    under_mask = lambda path: any(path.startswith(d + "/") for d in masked)  # noqa: E731
    keep = sorted(path for path in interpreter_paths() if under_mask(path))
    keep = [p for p in keep if not any(p.startswith(q + "/") for q in keep if q != p)]  # outermost only
    held = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in keep]  # reachable once hidden
    for directory in masked:
        writable = directory in WRITABLE_DIRS
        options = "size=%dm,mode=%s" % ((tmp_mb, "1777") if writable else (1, "755"))
        mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, fd in held:
        if os.path.isdir("/proc/self/fd/%d" % fd):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
        os.close(fd)
    # Read-only everywhere else: without it a sandbox that keeps the trainer's uid (no root to drop) could
    # overwrite that user's files. A mount hidden under a tmpfs above cannot be reached and is skipped.
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = fields[4].encode().decode("unicode_escape")
        bound_back = any(target == path or target.startswith(path + "/") for path in keep)
        if target in WRITABLE_DIRS or (under_mask(target) and not bound_back):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):
            flags |= MOUNT_FLAGS.get(option, 0)
        try:
            mount(None, target, None, flags)
        except OSError:
            if target == "/":
                raise


def set_limits(limits):
    for kind, soft, hard in limits:
        current = resource.getrlimit(kind)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(kind, (soft, hard))


def drop_privileges(libc, uid, read_all_files):
    """Drop every capability (and root, to ``uid``, so that RLIMIT_NPROC applies); no new privileges, not dumpable.

    ``read_all_files`` keeps CAP_DAC_READ_SEARCH across the drop: the opt-in mode for a root trainer whose
    interpreter uid 65534 cannot read when no private view is possible.
    """
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if os.geteuid() == 0:  # no capability can come back through exec either
        for cap in range(64):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; EINVAL past the last capability
                break
    if uid is not None:
        if read_all_files:
            libc_call(libc, "prctl", 8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    data = (Data * 2)()
    if uid is not None and read_all_files:
        data[0].effective = data[0].permitted = 1 << CAP_DAC_READ_SEARCH
    libc_call(libc, "capset", ctypes.byref(Header(0x20080522, 0)), data)
    libc_call(libc, "prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    libc_call(libc, "prctl", 4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<runner>/fd, no ptrace by the worker


# ------------------------------------------------------------------------------------- plain data on the wire
class NotPlainData(Exception):
    """A value that is not plain data (`PLAIN_TYPES`, exact types, nested at most `MAX_DEPTH` levels)."""


HEX_INT = re.compile(r"-?[0-9a-f]+")


def encode(value, depth=0, budget=None):
    """``value`` as JSON-ready data with type tags: strings, None and bools as themselves, everything else
    ``[tag, payload]`` (ints in hex, floats as float.hex: exact and linear in size). Raises NotPlainData, also
    when ``budget`` (a one-element list, counted down per value) runs out."""
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise NotPlainData("a value too large to send")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return ["int", format(value, "x")]
    if kind is float:
        return ["float", value.hex()]
    if kind is bytes:
        return ["bytes", base64.b64encode(value).decode("ascii")]
    if kind not in (list, tuple, set, dict):
        raise NotPlainData("a value of type %s" % type_name(kind))
    if depth >= MAX_DEPTH:
        raise NotPlainData("a value nested deeper than %d levels" % MAX_DEPTH)
    if kind is dict:
        return ["dict", [[encode(key, depth + 1, budget), encode(item, depth + 1, budget)]
                         for key, item in dict.items(value)]]
    return [kind.__name__, [encode(item, depth + 1, budget) for item in value]]


def decode(data, depth=0):
    """The value `encode` wrote, built afresh from exact built-in types; ValueError for anything else."""
    kind = type(data)
    if data is None or kind is bool or kind is str:
        return data
    if kind is not list or len(data) != 2 or type(data[0]) is not str or depth >= MAX_DEPTH:
        raise ValueError("not plain data")
    tag, payload = data
    if tag in ("int", "float", "bytes"):
        if type(payload) is not str:
            raise ValueError("not plain data")
        if tag == "int":
            if not HEX_INT.fullmatch(payload):
                raise ValueError("not plain data")
            return int(payload, 16)
        if tag == "float":
            return float.fromhex(payload)
        return base64.b64decode(payload.encode("ascii"), validate=True)
    if type(payload) is not list:
        raise ValueError("not plain data")
    if tag == "dict":
        if not all(type(pair) is list and len(pair) == 2 for pair in payload):
            raise ValueError("not plain data")
        items = [(decode(key, depth + 1), decode(item, depth + 1)) for key, item in payload]
    else:
        items = [decode(item, depth + 1) for item in payload]
    try:
        constructors = {"list": list, "tuple": tuple, "set": set, "dict": dict}
        if tag not in constructors:
            raise ValueError("not plain data")
        return constructors[tag](items)
    except TypeError:  # an unhashable key or element
        raise ValueError("not plain data") from None


def type_name(kind):
    name = getattr(kind, "__name__", None)
    return name if type(name) is str else "an object"


def send(fd, message, write=os.write):
    """One message: a JSON line."""
    data = (json.dumps(message) + "\n").encode("ascii")
    while data:
        data = data[write(fd, data):]


def exception_parts(exc):
    """(type name, message) of an exception of model code, whatever its __str__ does."""
    name = type_name(type(exc))
    try:
        text = str(exc)
        text = text[:1000] if type(text) is str else ""
    except BaseException:  # noqa: BLE001 - model code controls __str__
        text = ""
    return name, text


# ----------------------------------------------------------------------------------------- worker (model code)
def blocked(*args, **kwargs):
    raise PermissionError("process creation and signals are disabled in the verifier sandbox")


def block_python_level():
    """Speed bumps for accidents (a subprocess, a socket); the kernel limits and namespaces are the real walls."""
    import _posixsubprocess
    import posix
    import socket

    class NoNetworkSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the verifier sandbox")

    socket.socket = NoNetworkSocket
    for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "kill",
                 "killpg"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, blocked)
    _posixsubprocess.fork_exec = resource.setrlimit = resource.prlimit = blocked
    sys.modules["ctypes"] = sys.modules["_ctypes"] = None


def serve(code, call_fd, reply_fd, read=os.read, send=send, encode=encode, decode=decode, loads=json.loads,
          parts=exception_parts, exit=os._exit):
    """Run the solution, say which names it defines, then answer calls until the harness hangs up.

    Nothing here decides a verdict: whatever model code does to this process (its builtins, its frames, the
    pipes) can only change the answers, and the harness checks those.
    """
    block_python_level()
    namespace = {"__name__": "solution"}
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
    except BaseException as exc:  # exit(), SystemExit(0), KeyboardInterrupt: all failures
        send(reply_fd, ["raised", *parts(exc)])
        exit(0)
    functions, values, modules = [], [], []
    for name, value in list(namespace.items()):
        if type(name) is not str or name.startswith("__"):
            continue
        if type(value) is type(os):  # the harness imports the same module, if it is one of the standard library
            module_name = getattr(value, "__name__", None)
            modules.append([name, module_name if type(module_name) is str else None])
            continue
        if callable(value):
            functions.append(name)
            continue
        try:  # a plain-data global (a constant, a counter the tests read) within a size budget
            values.append([name, encode(value, budget=[VALUE_BUDGET])])
        except BaseException:  # noqa: BLE001 - not plain data, too large, or changing
            pass
    send(reply_fd, ["ready", functions, values, modules])
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = read(call_fd, 1 << 16)
            if not chunk:
                exit(0)
            buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        _, name, args, kwargs = loads(line)
        try:
            result = namespace[name](*decode(args), **decode(kwargs))
        except BaseException as exc:  # noqa: BLE001 - the harness decides what an exception means
            send(reply_fd, ["raised", *parts(exc)])
            continue
        try:
            reply = ["return", encode(result)]
        except NotPlainData as exc:
            reply = ["unsendable", str(exc)]
        except BaseException as exc:  # noqa: BLE001 - e.g. a container changed while being encoded
            reply = ["unsendable", "a value that could not be read (%s)" % parts(exc)[0]]
        send(reply_fd, reply)


def execute_program(code, exit=os._exit):
    """Run the code as ``__main__`` on fds 0 / 1 / 2, then exit: 0 after a normal end or any ``exit()`` (as
    LiveCodeBench: the output counts), 1 after another exception (its type and message on stderr)."""
    block_python_level()
    stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = stdout
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    status = 0
    try:
        exec(compile(code, "solution.py", "exec"), {"__name__": "__main__"})
    except SystemExit:
        pass
    except BaseException as exc:  # noqa: BLE001 - a runtime error of the program
        status = 1
        os.write(2, ("\n%s: %s" % exception_parts(exc)).encode("utf-8", "backslashreplace"))
    try:
        stdout.flush()
    except BaseException:  # noqa: BLE001 - closed or replaced by the program
        pass
    exit(status)


# --------------------------------------------------------------------------- harness (tests, never model code)
class Boundary(BaseException):
    """Raised into a test when a call to the solution gives no plain value; the test fails even if it catches it."""


class SolutionError(Exception):
    """An exception of the solution whose type is not a built-in exception class."""


def exception_from(name, text):
    """The solution's exception as the harness raises it: the built-in class of that name (not StopIteration,
    whose meaning would change the test's loop), else `SolutionError`."""
    cls = getattr(builtins, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration,
                                                                                       StopAsyncIteration)):
        try:
            return cls(text) if text else cls()
        except Exception:  # noqa: BLE001 - a class that wants other arguments (UnicodeDecodeError)
            pass
    return SolutionError("%s: %s" % (name, text) if text else name)


class Remote:
    """A function of the solution as the tests see it: a call sends its arguments and waits for the result."""

    def __init__(self, harness, name):
        self.harness, self.__name__ = harness, name

    def __call__(self, *args, **kwargs):
        return self.harness.call(self.__name__, args, kwargs)

    def __repr__(self):
        return "<solution function %s>" % self.__name__


class Harness:
    """The tests' side of the pipes to the solution: one call at a time, each within ``call_timeout`` seconds.

    ``stopped``: why the solution answers no more (it ended, timed out or broke the protocol); ``broken``: why
    the running test fails whatever it catches.
    """

    def __init__(self, call_fd, reply_fd, call_timeout):
        self.call_fd, self.reply_fd, self.call_timeout = call_fd, reply_fd, call_timeout
        self.buffer = bytearray()
        self.lock = threading.Lock()  # one call at a time, also when a test calls from threads
        self.poll = select.poll()
        self.poll.register(reply_fd, select.POLLIN)
        self.stopped = self.broken = None

    def receive(self, what):
        """The next message from the solution (a list), or None with ``stopped`` set."""
        deadline = time.monotonic() + self.call_timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self.poll.poll(left * 1000):
                self.stopped = "Timed out: %s gave no answer within %g s" % (what, self.call_timeout)
                return None
            chunk = os.read(self.reply_fd, 1 << 16)
            if not chunk:
                self.stopped = STOPPED
                return None
            self.buffer += chunk
            if len(self.buffer) > MAX_MESSAGE and b"\n" not in chunk:
                self.stopped = "%s sent a reply larger than %d MiB" % (what, MAX_MESSAGE >> 20)
                return None
        end = self.buffer.index(b"\n")
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            message = None
        if type(message) is not list or not message or type(message[0]) is not str:
            self.stopped = "%s sent a malformed reply" % what
            return None
        return message

    def fail(self, reason):
        self.broken = self.broken or reason
        raise Boundary(reason)

    def call(self, name, args, kwargs):
        with self.lock:
            return self.call_once(name, args, kwargs)

    def call_once(self, name, args, kwargs):
        if self.stopped is not None:
            self.fail(self.stopped)
        try:
            request = ["call", name, encode(list(args)), encode(dict(kwargs))]
        except NotPlainData as exc:
            self.fail("%s() was given %s: only plain data (%s) crosses to the solution" % (name, exc, PLAIN_TYPES))
        try:
            send(self.call_fd, request)
        except OSError:  # the solution's end of the pipe is closed
            self.stopped = STOPPED
            self.fail(STOPPED)
        what = "%s()" % name
        reply = self.receive(what)
        if reply is None:
            self.fail(self.stopped)
        kind = reply[0]
        if kind == "return" and len(reply) == 2:
            try:
                return decode(reply[1])
            except (ValueError, RecursionError):
                self.fail("%s returned something that is not plain data" % what)
        if kind == "raised" and len(reply) == 3 and type(reply[1]) is str and type(reply[2]) is str:
            cls = getattr(builtins, reply[1], None) if reply[1].isidentifier() else None
            if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, Exception):
                self.fail("%s raised %s: an exit fails the test" % (what, reply[1]))  # SystemExit and the like
            raise exception_from(reply[1][:100], reply[2][:1000])
        if kind == "unsendable" and len(reply) == 2 and type(reply[1]) is str:
            self.fail("%s returned %s, not plain data (%s)" % (what, reply[1][:200], PLAIN_TYPES))
        self.stopped = "%s sent a malformed reply" % what
        self.fail(self.stopped)

    def run(self, tests):
        """{"error": why the solution did not load or None, "failures": one per test (None: passed)}."""
        ready = self.receive("the solution")
        if ready is None:
            return {"error": "Solution " + self.stopped[0].lower() + self.stopped[1:], "failures": []}
        if ready[0] == "raised" and len(ready) == 3 and type(ready[1]) is str and type(ready[2]) is str:
            return {"error": "Solution raised " + ready[1][:100] + (": " + ready[2] if ready[2] else ""),
                    "failures": []}
        if (ready[0] != "ready" or len(ready) != 4 or not all(type(part) is list for part in ready[1:])
                or not all(type(pair) is list and len(pair) == 2 for pair in ready[2] + ready[3])):
            return {"error": "Solution sent a malformed reply", "failures": []}
        # The solution's functions as proxies, its plain-data globals as they were after it ran, and the standard
        # library modules it imported under their own names (imported here: never a file of the solution); never
        # a name that would shadow a builtin the tests use (an `abs` of its own).
        namespace = {"__name__": "tests"}
        pairs = [(name, Remote(self, name)) for name in ready[1]] + [tuple(pair) for pair in ready[2] + ready[3]]
        for i, (name, value) in enumerate(pairs):
            if (type(name) is not str or not name.isidentifier() or keyword.iskeyword(name)
                    or name.startswith("__") or hasattr(builtins, name)):
                continue
            if i >= len(pairs) - len(ready[3]):
                # Only under its own name: the solution cannot make a name the tests use mean another module.
                if (value == name and name in sys.stdlib_module_names and not name.startswith("_")
                        and name not in NOT_IMPORTED):
                    try:
                        namespace[name] = importlib.import_module(value)
                    except ImportError:
                        pass
                continue
            try:
                namespace[name] = value if type(value) is Remote else decode(value)
            except (ValueError, RecursionError):
                return {"error": "Solution sent a malformed reply", "failures": []}
        failures = []
        for i, test in enumerate(tests):
            if self.stopped is not None:
                failures.append("Not run: an earlier test stopped the solution")
                continue
            self.broken = None
            try:
                exec(compile(test, "test_%d" % (i + 1), "exec"), namespace)
                failure = None
            except BaseException as exc:  # noqa: BLE001 - any exception, exit or stop fails the test
                failure = describe(exc)
            failures.append(self.broken if self.broken is not None else failure)
        return {"error": None, "failures": failures}


# -------------------------------------------------------------------------------------- runner (trusted)
def how_it_ended(status):
    if os.WIFSIGNALED(status):
        names = {24: "CPU time limit exceeded", 25: "file size limit exceeded", 9: "killed (memory limit?)"}
        return names.get(os.WTERMSIG(status), "killed by signal %d" % os.WTERMSIG(status))
    return "exited with code %d" % os.WEXITSTATUS(status)


def wait_for(pid, timeout):
    """How the process ended, killing its process group after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return how_it_ended(status)
            left = deadline - time.monotonic()
            if left <= 0:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                os.waitpid(pid, 0)
                return "timed out after %g s" % timeout
            if pidfd is None:
                time.sleep(min(left, 0.005))
            else:
                select.select([pidfd], [], [], left)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def supervise_solution(job, result_fd):
    """Fork the worker that runs the solution and answers the harness; report how it ended.

    The rlimits apply to the worker only: a process limit on the runner could keep it from forking the
    worker when other processes of uid 65534 run on the machine.
    """
    worker = os.fork()
    if worker == 0:
        try:
            os.close(result_fd)
            set_limits(job["limits"])
            serve(job["code"], job["call_fd"], job["reply_fd"])
        finally:
            os._exit(0)
    os.close(job["call_fd"])
    os.close(job["reply_fd"])
    return {"ended": how_it_ended(os.waitpid(worker, 0)[1])}


def memfd(name, data=b""):
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_memfd(fd, limit):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def run_program(job, result_fd, text, budget):
    """One run of the program with ``text`` on stdin: its stdout (base64, at most ``budget`` bytes), how it
    ended and the end of its stderr."""
    stdin, stdout, stderr = memfd("stdin", text.encode("utf-8")), memfd("stdout"), memfd("stderr")
    worker = os.fork()
    if worker == 0:
        try:
            os.setpgid(0, 0)
            for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
                os.dup2(fd, target)
            for fd in (stdin, stdout, stderr, result_fd):
                os.close(fd)
            set_limits(job["limits"])
            execute_program(job["code"])
        finally:
            os._exit(1)
    try:
        os.setpgid(worker, worker)
    except OSError:  # it has already set it, or already exited
        pass
    ended = wait_for(worker, job["run_timeout"])
    output = read_memfd(stdout, budget + 1)
    error = read_memfd(stderr, 1 << 20)[-1000:].decode("utf-8", "replace").strip()
    for fd in (stdin, stdout, stderr):
        os.close(fd)
    if len(output) > budget:
        output, ended = b"", "wrote more than %d MiB to stdout over all tests" % (MAX_OUTPUT >> 20)
    return {"stdout": base64.b64encode(output).decode("ascii"), "ended": ended, "error": error}, len(output)


def run_programs(job, result_fd):
    runs, budget = [], MAX_OUTPUT
    for text in job["inputs"]:
        run, size = run_program(job, result_fd, text, budget)
        runs.append(run)
        budget -= size
    return {"runs": runs}


def main():
    job = json.loads(sys.stdin.buffer.read())
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the solution's and the tests' prints go nowhere
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        if job["private_files"]:
            make_private_view(libc, job["tmp_mb"])
            os.chdir("/tmp")
        drop_privileges(libc, job["uid"], job["read_all_files"])
    except OSError as exc:
        os.write(result_fd, (json.dumps({"setup_error": describe(exc)}) + "\n").encode())
        os._exit(0)
    if job["role"] == "solution":
        result = supervise_solution(job, result_fd)
    elif job["role"] == "program":
        result = run_programs(job, result_fd)
    else:  # the harness: no fork, so its limits apply to this process
        set_limits(job["limits"])
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * MAX_DEPTH))
        result = Harness(job["call_fd"], job["reply_fd"], job["call_timeout"]).run(job["tests"])
    os.write(result_fd, (json.dumps(result) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
