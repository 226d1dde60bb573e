"""The program that runs model code for `PythonTestsVerifier`: ``python -I sandbox_runner.py`` (standard library only).

It reads one job (JSON) from stdin and writes one result line (JSON) to stdout. Two processes:

- the *runner* builds the sandbox (private file-system view, limits, drop of root and of every capability),
  keeps stdout (the only way back to the trainer) and never runs model code. It is not dumpable, so the
  worker cannot open its file descriptors through /proc or ptrace it.
- the *worker* (forked) closes stdout, installs the Python-level blocks, runs the solution and then each test,
  and after each step reads a one-time token from the runner and sends back ``token + verdict``. The runner
  sends the next token only after it has the previous verdict, so no frame, global or object of the worker
  holds a usable token while model code runs, and a verdict the worker did not send (a forged one, a missing
  one because the code called exit or ``os._exit``, one too many) is a failure, never a pass.

Model code that reads the token pipe itself and writes well-formed verdicts can still forge them, and so can
code that rewrites the worker's locals (through ctypes, or on Python 3.13+ through ``frame.f_locals``): the
verdict is computed in the process that runs the code, so the results of a policy that targets this runner
cannot be trusted. The job fields are written by `sd_plugin.sandbox`.
"""

import json
import os
import resource
import sys

TOKEN_BYTES = 32  # hex characters of one token
MAX_REPORT = 4096  # bytes of one verdict line; the worker cuts its messages to 1000 characters
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
    sys.settrace = sys.setprofile = blocked  # a tracer could rewrite the worker's locals


def work(code, tests, tokens, reports, read=os.read, write=os.write, compile=compile, exec=exec,
         describe=describe, exit=os._exit):
    """Run the solution, then each test in its namespace; after each step send ``token + verdict``.

    Everything it calls after model code has run is bound here, before, and the steps are a tuple: model
    code that replaces module attributes or builtins, or mutates what it finds in frames, changes nothing.
    """
    block_python_level()
    steps = (("solution.py", code),) + tuple(("test_%d" % (i + 1), test) for i, test in enumerate(tests))
    namespace = {"__name__": "solution"}
    for filename, source in steps:
        try:
            exec(compile(source, filename, "exec"), namespace)
            verdict = b"P"
        except BaseException as exc:  # exit(), SystemExit(0), KeyboardInterrupt: all failures
            verdict = b"F" + describe(exc).encode("utf-8", "replace").replace(b"\n", b"\\n")
        write(reports, read(tokens, TOKEN_BYTES) + verdict[:1000] + b"\n")
        if verdict != b"P" and filename == "solution.py":
            break
    exit(0)


# -------------------------------------------------------------------------------------- runner (trusted)
def how_it_ended(status):
    if os.WIFSIGNALED(status):
        names = {24: "CPU time limit exceeded", 25: "file size limit exceeded", 9: "killed (memory limit?)"}
        return names.get(os.WTERMSIG(status), "killed by signal %d" % os.WTERMSIG(status))
    return "exited with code %d" % os.WEXITSTATUS(status)


class Reports:
    """Lines from the worker's pipe, each at most `MAX_REPORT` bytes."""

    def __init__(self, fd):
        self.fd, self.buffer = fd, b""

    def line(self):
        """The next line with its newline; b"" at end of file; None for an over-long or unterminated line."""
        while b"\n" not in self.buffer and len(self.buffer) <= MAX_REPORT:
            chunk = os.read(self.fd, MAX_REPORT)
            if not chunk:
                return None if self.buffer else b""
            self.buffer += chunk
        line, newline, self.buffer = self.buffer.partition(b"\n")
        return line + newline if newline and len(line) < MAX_REPORT else None

    def anything_left(self):
        os.set_blocking(self.fd, False)
        try:
            return bool(self.buffer or os.read(self.fd, 1))
        except BlockingIOError:
            return False


def collect_verdicts(worker, tokens, reports, steps):
    """One verdict per step (None: passed, str: why not), stopping after a failed solution; None if forged.

    The token for a step goes out only once the previous verdict is in. A step without a verdict (the
    worker exited or was killed) fails with how the worker ended.
    """
    verdicts = []
    while len(verdicts) < steps and (not verdicts or verdicts[0] is None):
        token = os.urandom(TOKEN_BYTES // 2).hex().encode()
        try:
            os.write(tokens, token)
        except BrokenPipeError:
            pass
        line = reports.line()
        if line == b"":
            verdicts.append("Stopped the sandbox: " + how_it_ended(os.waitpid(worker, 0)[1]))
            return verdicts
        if line is None or not line.startswith(token) or line[TOKEN_BYTES:TOKEN_BYTES + 1] not in (b"P", b"F"):
            return None
        passed = line[TOKEN_BYTES:TOKEN_BYTES + 1] == b"P"
        verdicts.append(None if passed else line[TOKEN_BYTES + 1:-1].decode("utf-8", "replace") or "failed")
    os.close(tokens)  # a worker waiting for one more token (someone else used one) gets end of file
    os.waitpid(worker, 0)
    return None if reports.anything_left() else verdicts


def supervise(job, result_fd):
    """Fork the worker, collect its verdicts and return the result for the trainer.

    The rlimits apply to the worker only: a process limit on the runner could keep it from forking the
    worker when other processes of uid 65534 run on the machine.
    """
    code, tests = job["code"], job["tests"]
    token_read, token_write = os.pipe()
    report_read, report_write = os.pipe()
    worker = os.fork()
    if worker == 0:
        try:
            for fd in (result_fd, token_write, report_read):
                os.close(fd)
            set_limits(job["limits"])
            work(code, tests, token_read, report_write)
        finally:
            os._exit(0)
    os.close(token_read)
    os.close(report_write)
    verdicts = collect_verdicts(worker, token_write, Reports(report_read), len(tests) + 1)
    if verdicts is None:
        return {"error": "Solution tampered with the verifier's report channel", "failures": []}
    if verdicts[0] is not None:
        stopped = verdicts[0].startswith("Stopped the sandbox")
        return {"error": ("Solution " + verdicts[0][0].lower() + verdicts[0][1:]) if stopped
                else "Solution raised " + verdicts[0], "failures": []}
    failures = verdicts[1:] + ["Not run: an earlier test stopped the sandbox"] * (len(tests) + 1 - len(verdicts))
    return {"error": None, "failures": failures}


def main():
    job = json.loads(sys.stdin.buffer.read())
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the solution's prints go nowhere
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
    result = supervise(job, result_fd)
    os.write(result_fd, (json.dumps(result) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
