"""The trainer's side of the sandbox that runs model code for `PythonTestsVerifier`.

`sandbox_setup` finds, once per interpreter, the strongest isolation this machine allows. `run_sandbox` starts
``python -I sandbox_runner.py`` (see that file for what happens inside) with a minimal environment (no token,
no key of the trainer's environment gets through), in its own session, and reads its result line;
`run_with_harness` starts two of them, the model's solution and the harness that runs the tests, each in its
own sandbox, joined only by two pipes.

Where ``unshare -m`` works (root, or unprivileged user namespaces) the code gets a private view of the file
system: empty read-only tmpfs over /root, /home, /run, /var/tmp, /mnt, /media, /srv, a private size-limited
/tmp and /dev/shm (4 x ``file_mb`` each), the interpreter bound back read-only, every other mount read-only,
a fresh /proc; no network (``unshare -n``), its own PID namespace, and as root uid 65534 without
capabilities. Elsewhere it falls back to what works (network and PID namespaces, dropping root, only the
Python-level blocks) and says loudly what is exposed. The mode that keeps CAP_DAC_READ_SEARCH (every file of
the machine readable) and running model code as root are refused unless ``allow_read_all_files``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, NamedTuple

from sd_plugin.sandbox_runner import MASKED_DIRS

logger = logging.getLogger("sd_plugin.verifiers")

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
NOBODY = 65534
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "OMP_NUM_THREADS": "1"}


class SandboxSetup(NamedTuple):
    """How `PythonTestsVerifier` isolates code on this machine (see `sandbox_setup`)."""

    prefix: list[str]       # command prefix: unshare with mount, network and PID namespaces, or less, or nothing
    uid: int | None         # uid to drop to (root only), None: keep the current one
    read_all_files: bool    # keep CAP_DAC_READ_SEARCH across the drop (opt-in: nobody cannot read the interpreter)
    private_files: bool = False  # private view of the file system (needs a mount namespace)


class SandboxUnavailable(RuntimeError):
    """No isolation that is safe by default works here (see the message for what to do)."""


_SANDBOX_SETUP: dict[tuple[str, bool], SandboxSetup] = {}
_SANDBOX_LOCK = threading.Lock()


def make_job(role: str, setup: SandboxSetup, *, cpu_seconds: float, memory_mb: int, max_processes: int, file_mb: int,
             **fields: Any) -> dict[str, Any]:
    """The job `sandbox_runner.py` reads: its role ("solution", "harness" or "program", see there), rlimits, how to
    isolate, and the role's ``fields``."""
    cpu_s, memory, fsize = math.ceil(cpu_seconds) + 1, memory_mb << 20, file_mb << 20
    limits = [(resource.RLIMIT_CPU, cpu_s, cpu_s + 1), (resource.RLIMIT_AS, memory, memory),
              (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0),
              (resource.RLIMIT_NPROC, max_processes, max_processes)]
    return {"role": role, "limits": limits, "uid": setup.uid, "read_all_files": setup.read_all_files,
            "private_files": setup.private_files, "tmp_mb": 4 * file_mb, **fields}


class _Sandbox:
    """One started ``python -I sandbox_runner.py`` (see `run_sandbox`); `finish` kills what is left of it."""

    def __init__(self, python: str, setup: SandboxSetup, job: dict[str, Any], pass_fds: tuple[int, ...] = ()):
        # stderr goes to a folder only the trainer can enter; the sandbox's own folder (its cwd when there is no
        # private /tmp) is another one, so nothing the code writes can replace what the trainer reads.
        self.private = tempfile.TemporaryDirectory(prefix="sd_verify_", ignore_cleanup_errors=True)
        self.work_dir = tempfile.TemporaryDirectory(prefix="sd_verify_work_", ignore_cleanup_errors=True)
        if setup.uid is not None:
            os.chown(self.work_dir.name, setup.uid, setup.uid)
        self.err_path = os.path.join(self.private.name, "stderr")
        self.job, self.out, self.timed_out, self.proc, self.problem = json.dumps(job).encode(), b"", False, None, ""
        with open(self.err_path, "wb") as err:
            try:
                self.proc = subprocess.Popen([*setup.prefix, python, "-I", RUNNER], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=err, cwd=self.work_dir.name,
                                             env=dict(SANDBOX_ENV), start_new_session=True, pass_fds=pass_fds)
            except OSError as exc:
                self.problem = f"Could not start the sandbox: {exc}"

    def communicate(self, timeout: float) -> None:
        """Send the job and read the results until the runner exits or ``timeout`` seconds pass."""
        if self.proc is None:
            return
        try:
            self.out = self.proc.communicate(self.job, timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            self.timed_out = True
        except (OSError, ValueError):  # killed by `finish` from another thread while writing or reading
            pass

    def finish(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass

    def result(self, timeout: float) -> tuple[dict | None, str]:
        """(the runner's last result line or None, a description of what went wrong); cleans up."""
        try:
            if self.proc is None:
                return None, self.problem
            if self.timed_out:
                return None, f"Timed out after {timeout:g} s"
            lines = self.out.decode(errors="replace").splitlines()
            try:
                result = json.loads(lines[-1])
            except (IndexError, ValueError):
                result = None
            if isinstance(result, dict) and "setup_error" in result:
                return None, f"Sandbox setup failed: {result['setup_error']}"
            if isinstance(result, dict):
                return result, ""
            with open(self.err_path, "rb") as f:
                stderr = f.read()[-2000:].decode(errors="replace").strip()
            signals = {-signal.SIGXCPU: "CPU time limit exceeded", -signal.SIGXFSZ: "file size limit exceeded",
                       -signal.SIGKILL: "killed (memory limit?)"}
            code = self.proc.returncode
            reason = signals.get(code, f"exited with code {code} without a result")
            return None, f"Sandbox {reason}" + (f": {stderr[-300:]}" if stderr else "")
        finally:
            self.private.cleanup()
            self.work_dir.cleanup()


def run_sandbox(python: str, setup: SandboxSetup, job: dict[str, Any], timeout: float) -> tuple[dict | None, str]:
    """Run the runner on ``job`` (a "program" job: no other process takes part) within ``timeout`` seconds;
    returns (its result or None, a description of what went wrong)."""
    sandbox = _Sandbox(python, setup, job)
    try:
        sandbox.communicate(timeout)
    finally:
        sandbox.finish()
    return sandbox.result(timeout)


def run_with_harness(python: str, setup: SandboxSetup, solution_job: dict[str, Any], harness_job: dict[str, Any],
                     timeout: float, grace: float = 0.5) -> tuple[dict | None, str, str | None]:
    """Run a "solution" and a "harness" job in two sandboxes joined by two pipes (calls one way, replies the other).

    Returns (the harness's result or None, what went wrong, how the solution's process ended or None). Both are
    killed after ``timeout`` seconds; once the harness is done, the solution gets ``grace`` seconds to end.
    """
    call_read, call_write = os.pipe()
    reply_read, reply_write = os.pipe()
    start, sandboxes = time.monotonic(), []
    try:
        solution = _Sandbox(python, setup, {**solution_job, "call_fd": call_read, "reply_fd": reply_write},
                            (call_read, reply_write))
        sandboxes.append(solution)
        harness = _Sandbox(python, setup, {**harness_job, "call_fd": call_write, "reply_fd": reply_read},
                           (call_write, reply_read))
        sandboxes.append(harness)
    finally:
        for fd in (call_read, call_write, reply_read, reply_write):  # each end now lives in one sandbox only
            os.close(fd)
        if len(sandboxes) < 2:
            for sandbox in sandboxes:
                sandbox.finish()
    thread = threading.Thread(target=solution.communicate, args=(timeout,), daemon=True)
    thread.start()
    try:
        harness.communicate(timeout)
        thread.join(min(grace, max(0.0, timeout - (time.monotonic() - start))))
    finally:
        harness.finish()
        solution.finish()
    thread.join()
    ended, solution_problem = solution.result(timeout)
    result, problem = harness.result(timeout)
    if ended is None and solution_problem and not solution_problem.startswith(("Timed out", "Sandbox killed")):
        return None, solution_problem, None  # the solution's runner failed (not its worker, not killed by us)
    return result, problem, ended.get("ended") if isinstance(ended, dict) else None


def _candidates(allow_read_all_files: bool) -> list[SandboxSetup]:
    """Setups to try, safest first."""
    unshare = shutil.which("unshare")
    root = os.geteuid() == 0
    pid_namespace = ["-p", "-f", "--kill-child"]
    candidates = []
    if unshare:
        private = ["-m", "-n", *pid_namespace, "--mount-proc"]
        # As root, a user namespace would map uid 0 to root itself: only the plain mount namespace is safe.
        candidates.append(SandboxSetup([unshare, *private], NOBODY, False, True) if root
                          else SandboxSetup([unshare, "-r", *private], None, False, True))
    prefixes = ([[unshare, "-n", *pid_namespace], [unshare, "-n"], [unshare, "-r", "-n", *pid_namespace],
                 [unshare, "-r", "-n"]] if unshare else [])
    if root:
        drops = [(NOBODY, False)] + ([(NOBODY, True), (None, False)] if allow_read_all_files else [])
    else:
        drops = [(None, False)]
    candidates += [SandboxSetup(prefix, uid, read_all, False)
                   for prefix, (uid, read_all) in itertools.product(prefixes + [[]], drops)]
    return candidates


def _exposure_warning(setup: SandboxSetup, why: str) -> str:
    mode = sandbox_mode_of(setup)
    uid = mode["uid"]
    readable = ("EVERY file of this machine (it keeps CAP_DAC_READ_SEARCH)" if setup.read_all_files
                else "every file of this machine (it runs as root)" if uid == 0
                else f"every file that uid {uid} can read (as the trainer's user: its home, its token files)")
    network = ("the network is cut" if "namespace" in mode["network"]
               else "the network is blocked only by a Python patch")
    pids = ("its processes die with it" if mode["pid_namespace"]
            else "a process it starts with setsid() can outlive it")
    return (f"python_tests sandbox: NO private file-system view here ({why}). Model code can read {readable}, "
            f"write where that uid can write, and reach AF_UNIX sockets in /tmp; {network}; {pids}. "
            "Run the trainer where `unshare -m` works (root, or unprivileged user namespaces), or in a container "
            "or VM with no credentials inside.")


def sandbox_setup(python: str = sys.executable, allow_read_all_files: bool = False) -> SandboxSetup:
    """How to isolate code run by `python` here, probed once per interpreter and cached.

    Tries a private file-system view (``unshare -m -n -p -f --kill-child --mount-proc``, as root with a drop to
    uid 65534, else with ``-r``), then ``unshare -n -p -f --kill-child`` / ``-n`` / ``-r -n -p ...`` / ``-r -n``
    / nothing, as root with a plain drop to uid 65534; keeps the first that runs a trivial job importing a
    module. Without a private view it warns once with what is exposed. As root, when uid 65534 cannot run
    `python` either, raises `SandboxUnavailable` unless ``allow_read_all_files`` (then it may keep
    CAP_DAC_READ_SEARCH or stay root).
    """
    key = (python, allow_read_all_files)
    with _SANDBOX_LOCK:
        if key not in _SANDBOX_SETUP:
            why = "`unshare` not found" if shutil.which("unshare") is None else ""
            found = None
            for setup in _candidates(allow_read_all_files):
                job = make_job("program", setup, cpu_seconds=10, memory_mb=1024, max_processes=64, file_mb=16,
                               code="import fractions\nprint(input())", inputs=["1"], run_timeout=10)
                result, problem = run_sandbox(python, setup, job, timeout=10)
                if result == {"runs": [{"stdout": "MQo=", "ended": "exited with code 0", "error": ""}]}:  # "1\n"
                    found = setup
                    break
                if setup.private_files:
                    why = f"{' '.join(setup.prefix[1:])}: {problem or result}"
            if found is None and os.geteuid() == 0 and not allow_read_all_files:
                raise SandboxUnavailable(
                    f"python_tests: no safe sandbox for {python} here: no private file-system view ({why}) and "
                    f"uid {NOBODY} cannot run this interpreter (is it under /root?). Run where `unshare -m` works, "
                    f"use a Python that uid {NOBODY} can read (e.g. under /usr or /opt), or pass verifier_kwargs "
                    "{allow_read_all_files: true} to let model code read every file of this machine."
                )
            _SANDBOX_SETUP[key] = found or SandboxSetup([], None, False, False)
            if not _SANDBOX_SETUP[key].private_files:
                logger.warning(_exposure_warning(_SANDBOX_SETUP[key], why or "unshare -m failed"))
        return _SANDBOX_SETUP[key]


def sandbox_mode_of(setup: SandboxSetup) -> dict[str, Any]:
    """`sandbox_mode` of a given setup."""
    prefix, uid, read_all_files, private_files = setup
    network_flags = [flag for flag in prefix[1:] if flag in ("-r", "-n")]
    network = f"namespace ({' '.join(['unshare', *network_flags])}) + socket patch" if prefix else "socket patch only"
    uid = uid if uid is not None else os.geteuid()
    return {"network": network, "pid_namespace": "-p" in prefix, "uid": uid, "process_limit": uid != 0,
            "read_all_files": read_all_files, "private_files": private_files,
            "hidden": ", ".join(MASKED_DIRS) if private_files else "", "command_prefix": prefix}


def sandbox_mode(python: str = sys.executable, allow_read_all_files: bool = False) -> dict[str, Any]:
    """What the sandbox uses here.

    ``network``: "namespace (unshare -n) + socket patch" (or ``-r -n``) or "socket patch only";
    ``pid_namespace``: whether all its processes die with it; ``uid``: the uid the code runs as;
    ``process_limit``: whether the kernel enforces RLIMIT_NPROC on it (not for root);
    ``read_all_files``: whether it kept CAP_DAC_READ_SEARCH; ``private_files``: whether it has a private view
    of the file system, ``hidden`` the folders replaced by empty ones there; ``command_prefix``.
    """
    return sandbox_mode_of(sandbox_setup(python, allow_read_all_files))
