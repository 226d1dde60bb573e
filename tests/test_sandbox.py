"""The `python_tests` sandbox against code written to game it (issue: the code verifier under RL pressure).

Exits during a test, forged verdicts, reading the trainer's secrets, reaching sockets in a shared /tmp. The
file-system tests need a mount namespace (``unshare -m``); they skip with the reason where it is not allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from sd_plugin import verifiers
from sd_plugin.verifiers import PythonTestsVerifier, sandbox_mode

ADD_TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(0, 0) == 0"]}


def _py(code: str) -> str:
    return f"```python\n{code}\n```"


def _unshare_allows_mounts() -> bool:
    """Whether this machine lets a process build a private file-system view (what the tests below need)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    user_namespace = [] if os.geteuid() == 0 else ["-r"]
    command = [unshare, *user_namespace, "-m", "-n", "-p", "-f", "--kill-child", "--mount-proc", "true"]
    return subprocess.run(command, capture_output=True).returncode == 0


needs_private_view = pytest.mark.skipif(
    not _unshare_allows_mounts(),
    reason="`unshare -m` is not allowed here: the sandbox has no private file-system view, so model code reads "
           "what its uid can read (the verifier warns once, see sandbox_mode())",
)


# ------------------------------------------------------------------------------------- exits during a test
@pytest.mark.parametrize(
    "body",
    ["raise SystemExit(0)", "exit()", "import sys; sys.exit()", "quit(0)", "raise KeyboardInterrupt",
     "import os; os._exit(0)", "import os; os._exit(3)"],
)
def test_any_exit_while_a_test_runs_fails_that_test(body):
    """An exit raised from inside the solution's function is not a pass (it scored 1.0 against failing asserts)."""
    code = f"def add(a, b):\n    {body}"
    reward, feedback = PythonTestsVerifier(partial_credit=True)("q", _py(code), ADD_TESTS)
    assert reward == 0.0
    assert feedback.startswith("Test 1 of 3 failed: assert add(1, 2) == 3\n"), feedback


def test_an_exit_after_some_tests_passed_fails_the_running_test_and_the_rest():
    code = "import os\ncalls = 0\ndef add(a, b):\n    global calls\n    calls += 1\n" \
           "    if calls == 2:\n        os._exit(0)\n    return a + b"
    tests = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]}
    reward, feedback = PythonTestsVerifier(partial_credit=True)("q", _py(code), tests)
    assert reward == pytest.approx(1 / 3)
    assert feedback == "Test 2 of 3 failed: assert add(2, 2) == 4\nStopped the sandbox: exited with code 0"


def test_an_exit_in_the_solution_before_the_tests_is_a_failed_solution():
    verify = PythonTestsVerifier(partial_credit=True)
    stopped = (0.0, "Solution stopped the sandbox: exited with code 0")
    assert verify("q", _py("import os\nos._exit(0)"), ADD_TESTS) == stopped
    assert verify("q", _py("exit(0)"), ADD_TESTS) == (0.0, "Solution raised SystemExit: 0")


# ------------------------------------------------------------------------------------------ forged results
# Each snippet defines add() wrong (every test fails) and tries to report passes instead.
FRAME_WALK = """
import json, os, sys
def add(a, b):
    frame = sys._getframe()
    while frame is not None:
        names = frame.f_locals
        job = names.get("job")
        if isinstance(job, dict) and "nonce" in job:  # the runner's nonce and result descriptor
            verdict = {"error": None, "failures": [None] * 30}
            os.write(names["result_fd"], ("\\n" + job["nonce"] + json.dumps(verdict) + "\\n").encode())
            os._exit(0)
        for value in list(names.values()):  # or any descriptor a runner frame holds
            if isinstance(value, int) and 2 < value < 256:
                try:
                    os.write(value, b"P\\n" * 30)
                except OSError:
                    pass
        frame = frame.f_back
    return -1
"""
PATCHED_WRITE = """
import os
real_write = os.write
def forge(fd, data):
    return real_write(fd, data.replace(b'"AssertionError"', b"null").replace(b"FAssertionError", b"P"))
os.write = forge
def add(a, b):
    return -1
"""
REWRITTEN_TESTS = """
import sys
frame = sys._getframe(1)
for value in frame.f_locals.values():
    if isinstance(value, list) and value and all(isinstance(test, str) for test in value):
        value[:] = ["pass"] * len(value)
def add(a, b):
    return -1
"""


@pytest.mark.parametrize("code", [FRAME_WALK, PATCHED_WRITE, REWRITTEN_TESTS],
                         ids=["frame-walk-to-the-result-channel", "patched-os-write", "rewritten-test-list"])
def test_model_code_cannot_forge_its_verdicts(code):
    """The runner's channel, nonce and test list are out of the code's reach (forging gave reward 10.0)."""
    reward, feedback = PythonTestsVerifier(partial_credit=True)("q", _py(code), ADD_TESTS)
    assert reward == 0.0, feedback


def test_only_one_verdict_per_test_is_accepted_and_rewards_stay_in_0_1(monkeypatch):
    """Whatever comes back from the sandbox, the reward is in [0, 1] and needs exactly one verdict per test."""
    verify = PythonTestsVerifier(partial_credit=True)
    for forged in ({"error": None, "failures": [None] * 30}, {"error": None, "failures": [None]},
                   {"error": None, "failures": [None, None, 7]}, {"error": "x", "failures": [None] * 3},
                   {"error": None, "failures": [None] * 3, "extra": 1}, ["not", "a", "dict"]):
        monkeypatch.setattr(verifiers, "run_sandbox", lambda *args, result=forged: (result, ""))
        assert verify("q", _py("def add(a, b):\n    return a + b"), ADD_TESTS) == (
            0.0, "Sandbox returned a malformed result"), forged
    monkeypatch.setattr(verifiers, "run_sandbox", lambda *args: ({"error": None, "failures": [None] * 3}, ""))
    assert verify("q", "", ADD_TESTS) == (1.0, None)


# ------------------------------------------------------------------------------------- the trainer's secrets
@pytest.fixture
def planted_token():
    """A fake token, 0600 in a 0700 folder of the trainer's user: under /root when run as root (a temporary
    subfolder, deleted after), else under the home folder's temp subfolder; never a real user file."""
    base = Path("/root") if os.geteuid() == 0 else Path.home()
    folder = Path(tempfile.mkdtemp(prefix=".sd_plugin_test_secret_", dir=base))
    try:
        folder.chmod(0o700)
        token = folder / "token"
        token.write_text("hf_FAKEtoken0123456789")
        token.chmod(0o600)
        yield token
    finally:
        shutil.rmtree(folder, ignore_errors=True)


LEAK = "import os\ndef add(a, b):\n    raise ValueError(repr({what}))"


@needs_private_view
def test_a_token_file_of_the_trainer_is_invisible_to_model_code(planted_token):
    """It came back in the feedback (SDPO's teacher prompt, the logs) when read as root with CAP_DAC_READ_SEARCH."""
    assert sandbox_mode()["private_files"]
    code = LEAK.format(what=f"open({str(planted_token)!r}).read()")
    reward, feedback = PythonTestsVerifier()("q", _py(code), ADD_TESTS)
    assert reward == 0.0 and "hf_FAKE" not in feedback and "FileNotFoundError" in feedback, feedback
    listing = LEAK.format(what=f"os.listdir({str(planted_token.parent.parent)!r})")
    feedback = PythonTestsVerifier()("q", _py(listing), ADD_TESTS).feedback
    assert planted_token.parent.name not in feedback, feedback


@needs_private_view
def test_root_only_files_outside_the_hidden_folders_stay_unreadable():
    if os.geteuid() != 0:
        pytest.skip("as a normal user the sandbox cannot read root's files anyway")
    code = LEAK.format(what="open('/etc/shadow').read()")
    reward, feedback = PythonTestsVerifier()("q", _py(code), ADD_TESTS)
    assert reward == 0.0 and "PermissionError" in feedback, feedback


@needs_private_view
def test_model_code_runs_without_capabilities_or_a_way_to_gain_them():
    """As root the sandbox kept CAP_DAC_READ_SEARCH (read every file); now nothing, and no_new_privs."""
    code = ("status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
            "caps = {k: status[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs')}\n"
            "def add(a, b):\n    raise ValueError(repr(sorted(caps.items())))")
    feedback = PythonTestsVerifier()("q", _py(code), ADD_TESTS).feedback
    zero = "0" * 16
    expected = [("CapAmb", zero), ("CapBnd", zero), ("CapEff", zero), ("CapInh", zero), ("CapPrm", zero),
                ("NoNewPrivs", "1")]
    assert feedback.endswith(f"ValueError: {expected!r}"), feedback


@needs_private_view
def test_model_code_sees_neither_the_trainers_processes_nor_its_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEenv0123456789")
    code = (
        "import os\ndef cmdline(pid):\n    try:\n        return open('/proc/%s/cmdline' % pid).read()\n"
        "    except OSError:\n        return ''\n"
        "seen = [c for c in map(cmdline, os.listdir('/proc')) if 'pytest' in c][:1] + [os.environ.get('HF_TOKEN')]\n"
        "def add(a, b):\n    raise ValueError(repr(seen))"
    )
    feedback = PythonTestsVerifier()("q", _py(code), ADD_TESTS).feedback
    assert feedback.endswith("ValueError: [None]"), feedback


@needs_private_view
def test_model_code_writes_only_to_its_private_tmp():
    code = ("import os\nopen('/tmp/scratch', 'w').write('ok')\n"
            "def add(a, b):\n    return len(open('/tmp/scratch').read()) + a + b - 2")
    assert PythonTestsVerifier()("q", _py(code), {"tests": ["assert add(1, 2) == 3"]}) == (1.0, None)
    probe = Path(tempfile.mkdtemp(prefix="sd_verify_test_", dir="/var/tmp"))
    try:
        probe.chmod(0o777)
        code = f"open({str(probe / 'x')!r}, 'w').write('x')"
        reward, feedback = PythonTestsVerifier()("q", _py(code), ADD_TESTS)
        assert reward == 0.0 and not (probe / "x").exists(), feedback
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# ------------------------------------------------------------------------------------- sockets in a shared /tmp
@needs_private_view
def test_a_unix_socket_in_the_shared_tmp_is_unreachable():
    """The network namespace does not cover AF_UNIX sockets on the file system; the private /tmp does."""
    folder = Path(tempfile.mkdtemp(prefix="sd_verify_test_", dir="/tmp"))
    path = folder / "agent.sock"
    server = socket.socket(socket.AF_UNIX)
    accepted = []
    try:
        folder.chmod(0o777)
        server.bind(str(path))
        path.chmod(0o777)
        server.listen(1)
        server.settimeout(5)

        def wait_for_a_client():
            try:
                accepted.append(server.accept())
            except OSError:  # timed out, or closed at the end of the test
                pass

        thread = threading.Thread(target=wait_for_a_client, daemon=True)
        thread.start()
        code = ("import _socket\ns = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
                f"s.connect({str(path)!r})\nraise ValueError('connected')")
        reward, feedback = PythonTestsVerifier(timeout=3)("q", _py(code), ADD_TESTS)
        assert reward == 0.0 and "connected" not in feedback and "FileNotFoundError" in feedback, feedback
        thread.join(0.2)
        assert not accepted
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------- as a normal user
USER = 65534  # a normal user for this test: uid 65534 with a home folder of its own
AS_USER_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from sd_plugin.verifiers import PythonTestsVerifier
verify = PythonTestsVerifier(python=sys.executable)
results = [verify("q", code, {"tests": ["pass"]}) for code in sys.argv[2:]]
print(json.dumps({"results": results}))
"""
REPO = Path(__file__).resolve().parent.parent


def _as_user(*command: str) -> subprocess.CompletedProcess:
    setpriv = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]
    return subprocess.run([*setpriv, "env", "-i", "PATH=/usr/bin:/bin", *command], capture_output=True, text=True)


def _python_for_a_normal_user() -> str | None:
    """A Python that uid 65534 can run and that can import sd_plugin.verifiers, when this test runs as root."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("unshare") is None:
        return None
    importable = f"import sys; sys.path.insert(0, {str(REPO)!r}); import sd_plugin.verifiers"
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(python) and _as_user(python, "-c", importable).returncode == 0:
            user_namespace = _as_user("unshare", "-r", "-m", "-n", "-p", "-f", "--kill-child", "--mount-proc", "true")
            return python if user_namespace.returncode == 0 else None
    return None


def test_as_a_normal_user_the_sandbox_neither_reads_nor_overwrites_the_users_files():
    """Without root to drop, the code ran with the user's permissions: it read and overwrote the user's files.
    Here uid 65534 plays the user (with a user namespace): its home is hidden, its other files are read-only."""
    python = _python_for_a_normal_user()
    if python is None:
        pytest.skip("needs root (to play a normal user with setpriv), a Python that uid 65534 can run, and "
                    "unprivileged user namespaces (`unshare -r -m`) allowed here")
    home = Path(tempfile.mkdtemp(prefix="sd_plugin_test_user_", dir="/home")) if os.path.isdir("/home") else None
    elsewhere = Path(tempfile.mkdtemp(prefix=".sd_plugin_test_user_", dir=Path(__file__).parent))
    try:
        if home is None:
            pytest.skip("no /home here")
        token, data = home / "token", elsewhere / "data.txt"
        token.write_text("hf_FAKEtoken0123456789")
        data.write_text("the user's data")
        for path, mode in ((home, 0o700), (token, 0o600), (elsewhere, 0o755), (data, 0o644)):
            os.chown(path, USER, USER)
            path.chmod(mode)
        snippets = [f"raise ValueError(open({str(token)!r}).read())", f"open({str(data)!r}, 'w').write('overwritten')"]
        run = _as_user(python, "-c", AS_USER_SCRIPT, str(REPO), *snippets)
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        (_, read), (_, write) = report["results"]
        assert read.startswith("Solution raised FileNotFoundError"), read
        # Read-only where it is visible; where the checkout lives under /tmp (the sandbox's /tmp is private) the
        # file is not there at all. Either way the write fails and the user's file is untouched.
        assert write.startswith(("Solution raised OSError: [Errno 30] Read-only file system",
                                 "Solution raised FileNotFoundError")), write
        assert data.read_text() == "the user's data"
    finally:
        for folder in (home, elsewhere):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
