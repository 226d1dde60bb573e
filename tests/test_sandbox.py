"""The `python_tests` sandbox against code written to game it (issues: the code verifier under RL pressure, 25).

Exits during a test, forged verdicts, attacks on the tests (objects that equal anything, hidden tests read from
frames, replaced builtins, restored tracing, the pipes, ctypes) in both sandbox modes, plain data across the
boundary, reading the trainer's secrets, reaching sockets in a shared /tmp. The file-system tests need a mount
namespace (``unshare -m``); they skip with the reason where it is not allowed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sd_plugin import sandbox, verifiers
from sd_plugin.sandbox_runner import NotPlainData, decode, encode
from sd_plugin.verifiers import PythonTestsVerifier, SandboxUnavailable, sandbox_mode

ADD_TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(0, 0) == 0"]}
STDIO_TESTS = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "1 2", "output": "3"},
                         {"input": "2 1\n", "output": " 3 "}]}


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
        monkeypatch.setattr(verifiers, "run_with_harness", lambda *args, result=forged: (result, "", None))
        assert verify("q", _py("def add(a, b):\n    return a + b"), ADD_TESTS) == (
            0.0, "Sandbox returned a malformed result"), forged
    monkeypatch.setattr(verifiers, "run_with_harness", lambda *args: ({"error": None, "failures": [None] * 3}, "", None))
    assert verify("q", "", ADD_TESTS) == (1.0, None)
    run = {"stdout": "Mwo=", "ended": "exited with code 0", "error": ""}  # "3\n"
    for forged in ({"runs": [run] * 2}, {"runs": [run, run, {**run, "stdout": "not base64!"}]},
                   {"runs": [run] * 3, "extra": 1}, {"runs": [{**run, "ended": 0}] * 3}, None):
        monkeypatch.setattr(verifiers, "run_sandbox", lambda *args, result=forged: (result, "") if result else
                            ([], ""))
        assert verify("q", "", STDIO_TESTS) == (0.0, "Sandbox returned a malformed result"), forged
    monkeypatch.setattr(verifiers, "run_sandbox", lambda *args: ({"runs": [run] * 3}, ""))
    assert verify("q", "", STDIO_TESTS) == (1.0, None)


# ------------------------------------------------------ the tests never run in the solution's process (issue 25)
# Each attack gave reward 1.0 for a wrong `add` when the tests ran in the solution's namespace and process. The
# solution now runs in a sandbox of its own and only answers calls; the tests run in a harness process that sees
# its functions as proxies and gets back plain data only.
EQ_ALWAYS_TRUE = """
class Anything:
    def __eq__(self, other):
        return True
    def __lt__(self, other):
        return True
    __ne__ = __gt__ = lambda self, other: False
    __sub__ = __rsub__ = __abs__ = __neg__ = lambda self, *other: self
def add(a, b):
    return Anything()
"""
INT_SUBCLASS_EQ_TRUE = """
class Int(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Int(a - b)
"""
HIDDEN_TESTS_FROM_FRAMES = r"""
import ast, gc, re, sys
def texts(value, depth=0):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)) and depth < 3:
        for item in value:
            yield from texts(item, depth + 1)
def answers():
    found, frame = [], sys._getframe(1)
    while frame is not None:  # the calling frames: the test, the worker that runs it, ...
        found += [text for value in list(frame.f_locals.values()) for text in texts(value)]
        frame = frame.f_back
    found += [text for obj in gc.get_objects() if isinstance(obj, (list, tuple)) for text in texts(obj)]
    pattern = re.compile(r"add\(([-\d.]+), ([-\d.]+)\) == ([-\d.]+)")
    return {(a, b): ast.literal_eval(c) for text in found for a, b, c in pattern.findall(text)}
def add(a, b):
    return answers().get((repr(a), repr(b)), a - b)  # hard-coded from the hidden tests, else wrong
"""
BUILTIN_REPLACED = "import builtins\nbuiltins.abs = lambda x: 0\ndef add(a, b):\n    return a - b"
BUILTIN_SHADOWED = "def abs(x):\n    return 0\ndef add(a, b):\n    return a - b"
TRACING_RESTORED = """
import _imp, sys
from importlib.machinery import ModuleSpec
_imp.create_builtin(ModuleSpec("sys", None))  # refills sys with the settrace the sandbox blocked
def tracer(frame, event, arg):
    names = frame.f_locals
    if isinstance(names.get("verdict"), bytes) and names["verdict"] != b"P":
        names["verdict"] = b"P"  # the worker's verdict for the running test
    if names.get("failure") is not None:
        names["failure"] = None
    return tracer
sys.settrace(tracer)
frame = sys._getframe()
while frame is not None:
    frame.f_trace, frame.f_trace_lines = tracer, True
    frame = frame.f_back
def add(a, b):
    return a - b
"""
PIPE_READ = """
import fcntl, os, time
def add(a, b):
    readers, writers = [], []
    for fd in range(3, 256):
        try:
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            continue
        (readers if mode == os.O_RDONLY else writers if mode == os.O_WRONLY else []).append(fd)
    for _ in range(20):  # every token (or call) that comes is answered with a pass
        for fd in readers:
            os.set_blocking(fd, False)
            try:
                token = os.read(fd, 32)
            except BlockingIOError:
                continue
            for out in writers:
                if token:
                    os.write(out, token + b"P\\n")
        time.sleep(0.05)
    os._exit(0)
"""
CTYPES_REIMPORTED = """
import gc, sys
for name in ("ctypes", "_ctypes"):
    sys.modules.pop(name, None)  # the blocker
import ctypes
DATA = sys.getsizeof("") - 1  # where the characters of a compact ASCII str start
for obj in gc.get_objects():  # every test source in this process becomes `pass`
    if isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, str) and item.isascii() and item.startswith("assert add("):
                ctypes.memmove(id(item) + DATA, b"pass".ljust(len(item)), len(item))
def add(a, b):
    return a - b
"""
STOP_ITERATION = "def add(a, b):\n    raise StopIteration"
WRONG_ADD_TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0.5, 0.25) == 0.75"]}
ABS_TESTS = {"tests": ["assert abs(add(1, 2) - 3) < 1e-9", "assert abs(add(2, 2) - 4) < 1e-9"]}
MAP_TESTS = {"tests": ["assert all(map(lambda x: add(x, 1) == x + 1, range(3)))"]}
ATTACKS = {
    "eq-always-true": (EQ_ALWAYS_TRUE, {"tests": [*WRONG_ADD_TESTS["tests"], *ABS_TESTS["tests"]]}),
    "int-subclass-eq-true": (INT_SUBCLASS_EQ_TRUE, WRONG_ADD_TESTS),
    "hidden-tests-from-the-calling-frame": (HIDDEN_TESTS_FROM_FRAMES, WRONG_ADD_TESTS),
    "builtins-abs-replaced": (BUILTIN_REPLACED, ABS_TESTS),
    "abs-shadowed-by-the-solution": (BUILTIN_SHADOWED, ABS_TESTS),
    "tracing-restored-through-_imp.create_builtin": (TRACING_RESTORED, WRONG_ADD_TESTS),
    "token-pipe-read": (PIPE_READ, WRONG_ADD_TESTS),
    "ctypes-reimported-rewrites-the-tests": (CTYPES_REIMPORTED, WRONG_ADD_TESTS),
    "stop-iteration-ends-the-tests-map": (STOP_ITERATION, MAP_TESTS),
}
RIGHT_ADD = "def add(a, b):\n    return a + b"
_FALLBACK_SETUPS: dict = {}  # the fallback mode's probe, shared by the tests below (probing takes a second)


@pytest.fixture(params=["private-view", "fallback"])
def sandbox_kwargs(request, monkeypatch):
    """The verifier's kwargs for each sandbox mode this machine allows: the private view (``unshare -m``), and the
    fallback forced as the fallback test of test_verifiers does (no unshare; as root with an interpreter uid 65534
    cannot read, only with ``allow_read_all_files``)."""
    if request.param == "private-view":
        if not _unshare_allows_mounts():
            pytest.skip("`unshare -m` is not allowed here: only the fallback mode runs")
        assert sandbox_mode()["private_files"]
        return {}
    monkeypatch.setattr(sandbox, "_SANDBOX_SETUP", _FALLBACK_SETUPS)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        kwargs, mode = {}, sandbox_mode()
    except SandboxUnavailable:
        kwargs = {"allow_read_all_files": True}
        mode = sandbox_mode(**kwargs)
    assert not mode["private_files"] and mode["command_prefix"] == []
    return kwargs


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_on_the_tests_get_no_reward_for_a_wrong_add(attack, sandbox_kwargs):
    code, tests = ATTACKS[attack]
    reward, feedback = PythonTestsVerifier(partial_credit=True, **sandbox_kwargs)("q", _py(code), tests)
    assert reward == 0.0, feedback


def test_honest_solutions_right_and_wrong_in_each_mode(sandbox_kwargs):
    verify = PythonTestsVerifier(partial_credit=True, **sandbox_kwargs)
    assert verify("q", _py(RIGHT_ADD), WRONG_ADD_TESTS) == (1.0, None)
    assert verify("q", _py(RIGHT_ADD), ABS_TESTS) == (1.0, None)
    assert verify("q", _py(RIGHT_ADD), MAP_TESTS) == (1.0, None)
    assert verify("q", _py("def add(a, b):\n    return a - b"), WRONG_ADD_TESTS) == (
        0.0, "Test 1 of 3 failed: assert add(1, 2) == 3\nAssertionError")
    program = "a, b = map(int, input().split())\nprint(a + b)"
    assert verify("q", _py(program), STDIO_TESTS) == (1.0, None)
    assert verify("q", _py(program.replace("+", "-")), STDIO_TESTS) == (
        0.0, "Test 1 of 3 failed: input '1 2\\n'\nWrong answer on line 1: got '-1', expected '3'")


def test_the_tests_fail_whatever_they_catch_when_a_call_gives_no_plain_value():
    """The harness holds the verdict: a test that swallows the error of a bad call still fails."""
    catching = ("try:\n    result = add(1, 2)\nexcept BaseException:\n    result = 3\nassert result == 3")
    verify = PythonTestsVerifier(call_timeout=1.0, timeout=5.0)
    big = PythonTestsVerifier(call_timeout=10.0, timeout=20.0)  # 17 MiB through a pipe is slow on a loaded machine
    for verifier, code, why in (
            (verify, EQ_ALWAYS_TRUE, "add() returned a value of type Anything, not plain data"),
            (verify, "import os\ndef add(a, b):\n    os._exit(0)", "Stopped the sandbox: exited with code 0"),
            (verify, "def add(a, b):\n    exit(0)", "add() raised SystemExit: an exit fails the test"),
            (verify, "def add(a, b):\n    while True:\n        pass", "Timed out: add() gave no answer within 1 s"),
            (big, "def add(a, b):\n    return 'x' * (17 << 20)", "add() sent a reply larger than 16 MiB")):
        reward, feedback = verifier("q", _py(code), {"tests": [catching]})
        assert reward == 0.0 and feedback.startswith(f"Test 1 of 1 failed: {catching}\n{why}"), feedback


def test_only_plain_data_crosses_and_exceptions_keep_their_builtin_type():
    code = ("class Mine(Exception):\n    pass\n"
            "def echo(*args, **kwargs):\n    return [args, kwargs]\n"
            "def fail(kind):\n    raise {'value': ValueError('bad'), 'mine': Mine('own'), 'key': KeyError('k')}[kind]\n"
            "def gen():\n    yield 1\n"
            "TABLE = {(1, 2): {b'x', 3.5}, 'n': [None, True, 2 ** 200, float('inf')]}\n"
            "counter = 7")
    tests = [
        "value = [1, (2, -3), {'a': {4, 5}}, b'\\x00\\xff', None, True, 1.5, 2 ** 100, 'txt']\n"
        "assert echo(*value, key=value) == [tuple(value), {'key': value}]\n"
        "assert [type(x) for x in echo(1, True, 1.0)[0]] == [int, bool, float]",
        "try:\n    fail('value')\nexcept ValueError as exc:\n    assert str(exc) == 'bad'\nelse:\n    raise AssertionError",
        "try:\n    fail('key')\nexcept KeyError:\n    pass\nelse:\n    raise AssertionError",
        "try:\n    fail('mine')\nexcept Exception as exc:\n    assert str(exc) == 'Mine: own', exc",
        "assert TABLE == {(1, 2): {b'x', 3.5}, 'n': [None, True, 2 ** 200, float('inf')]} and counter == 7",
        "gen()",
        "echo(lambda: 1)",
    ]
    reward, feedback = PythonTestsVerifier(partial_credit=True)("q", _py(code), {"tests": tests})
    assert reward == pytest.approx(5 / 7)
    assert feedback == ("Test 6 of 7 failed: gen()\ngen() returned a value of type generator, not plain data "
                        "(None, bool, int, float, str, bytes, list, tuple, dict, set)"), feedback
    reward, feedback = PythonTestsVerifier()("q", _py(code), {"tests": ["echo(lambda: 1)"]})
    assert feedback.startswith("Test 1 of 1 failed: echo(lambda: 1)\necho() was given a value of type function"), feedback


def test_the_tests_see_the_standard_library_modules_the_solution_imported_as_their_own_imports():
    """MBPP-style tests use `math` that only the solution imported: the harness imports the module of that name
    itself (never a file of the solution); not under another name (`import cmath as math` must not change what
    `math` means to the tests), not modules that act on import, not over a builtin."""
    code = ("import math\nimport collections.abc\nimport this\nimport json as abs\nimport os as sys\n"
            "def area(r):\n    return math.pi * r * r")
    tests = ["assert math.isclose(area(2), 12.566, rel_tol=1e-3)", "assert collections.OrderedDict and abs(-1) == 1",
             "sys", "this"]
    reward, feedback = PythonTestsVerifier(partial_credit=True)("q", _py(code), {"tests": tests})
    assert reward == 0.5 and feedback == "Test 3 of 4 failed: sys\nNameError: name 'sys' is not defined", feedback
    code = "import cmath as math\ndef area(r):\n    return 3 * r * r"
    reward, feedback = PythonTestsVerifier()("q", _py(code), {"tests": ["assert math.isclose(area(2), 12.566)"]})
    assert reward == 0.0 and feedback.endswith("NameError: name 'math' is not defined"), feedback


def test_a_call_that_hangs_fails_its_test_and_stops_the_rest_within_the_call_timeout():
    code = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b"
    tests = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]}
    start = time.monotonic()
    reward, feedback = PythonTestsVerifier(partial_credit=True, timeout=10, call_timeout=1)("q", _py(code), tests)
    assert time.monotonic() - start < 1 + 4
    assert reward == pytest.approx(1 / 3)
    assert feedback == "Test 2 of 3 failed: assert add(2, 2) == 4\nTimed out: add() gave no answer within 1 s"


@needs_private_view
def test_a_solution_sandbox_that_fails_to_start_is_reported_not_blamed_on_the_solution(monkeypatch):
    real_make_job = verifiers.make_job

    def broken_solution_job(role, setup, **fields):
        job = real_make_job(role, setup, **fields)
        return {**job, "tmp_mb": "not a size"} if role == "solution" else job

    monkeypatch.setattr(verifiers, "make_job", broken_solution_job)
    reward, feedback = PythonTestsVerifier()("q", _py(RIGHT_ADD), WRONG_ADD_TESTS)
    assert reward == 0.0 and feedback.startswith("Sandbox exited with code 1 without a result"), feedback


def test_plain_data_encoding_is_exact_and_strict():
    values = [None, True, False, 0, -(2 ** 5000), 1.5, -0.0, float("inf"), "é\n", b"\x00", [1, [2]], (1,), set(),
              {(1, "a"): {2}}, {}]
    for value in values:
        back = decode(json.loads(json.dumps(encode(value))))
        assert back == value and type(back) is type(value)
    assert math.isnan(decode(encode(float("nan"))))
    assert math.copysign(1, decode(encode(-0.0))) == -1
    for bad in [type("Int", (int,), {})(1), type("Str", (str,), {})("x"), object(), 1j,
                frozenset(), bytearray(b"x"), print]:
        with pytest.raises(NotPlainData):
            encode(bad)
    nested = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(NotPlainData):
        encode(nested)
    with pytest.raises(NotPlainData):
        encode(list(range(10)), budget=[5])
    for bad in [1, 1.5, {"int": "1"}, ["int", 1], ["int", "1_0"], ["int", " 1"], ["float", 1.0], ["bytes", "!!"],
                ["set", [["list", []]]], ["dict", [["list", []], None]], ["dict", [[1]]], ["frozenset", []],
                ["list", [["int", "1"]], "extra"], ["list"], [], ["int", "0x1"]]:
        with pytest.raises(ValueError):
            decode(bad)


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
