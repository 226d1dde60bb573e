"""Verifiers: tool calls, multiple choice, boxed math, sandboxed Python tests, loading and safe calls.

Real rows come from tests/fixtures/verifiers (lasgroup/SDPO, Apache-2.0); see the README there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from sd_plugin import sandbox
from sd_plugin.verifiers import (
    BUILTIN_VERIFIERS,
    BoxedMathVerifier,
    MultipleChoiceVerifier,
    PythonTestsVerifier,
    SandboxUnavailable,
    ToolCallVerifier,
    Verifier,
    VerifierResult,
    load_verifier,
    safe_verify,
    sandbox_mode,
    stdio_mismatch,
)

FIXTURES = Path(__file__).parent / "fixtures" / "verifiers"


def _rows(name: str) -> list[dict]:
    with open(FIXTURES / name) as f:
        return [json.loads(line) for line in f]


TOOLUSE = _rows("tooluse_rows.jsonl")
CHEMISTRY = _rows("chemistry_rows.jsonl")


def _gold(row: dict) -> list[tuple[str, dict]]:
    return [(call["Action"], json.loads(call["Action_Input"])) for call in json.loads(row["answer"])]


def _react(calls: list[tuple[str, object]]) -> str:
    """A ReAct completion; an input given as str is written verbatim."""
    blocks = []
    for name, args in calls:
        text = args if isinstance(args, str) else json.dumps(args)
        blocks.append(f"Thought: I should call {name}.\nAction: {name}\nAction Input: {text}\nObservation: ...")
    return "\n".join(blocks) + "\nThought: I now know the final answer\nFinal Answer: done"


# ------------------------------------------------------------------------------------------------ tool calls
def test_fixture_rows_are_real_and_complete():
    assert len(TOOLUSE) == 5 and len(CHEMISTRY) == 5
    assert all(set(row) == {"idx", "prompt", "answer"} for row in TOOLUSE)
    assert all(set(row) == {"idx", "prompt", "answer", "system"} for row in CHEMISTRY)
    assert {row["answer"] for row in CHEMISTRY} == set("ABCD")
    assert "Action Input:" in TOOLUSE[0]["prompt"] and "<answer>" in CHEMISTRY[0]["system"]


@pytest.mark.parametrize("row", TOOLUSE, ids=lambda row: str(row["idx"]))
def test_tool_call_real_rows_gold_react_completion_is_correct(row):
    verify = ToolCallVerifier()
    assert verify(row["prompt"], _react(_gold(row)), row) == (1.0, None)


@pytest.mark.parametrize("row", TOOLUSE, ids=lambda row: str(row["idx"]))
def test_tool_call_real_rows_hermes_tool_call_blocks_are_correct(row):
    completion = "".join(
        f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>\n' for name, args in _gold(row)
    )
    assert ToolCallVerifier()(row["prompt"], completion, row) == (1.0, None)


@pytest.mark.parametrize("row", TOOLUSE, ids=lambda row: str(row["idx"]))
def test_tool_call_real_rows_wrong_action_name(row):
    calls = _gold(row)
    calls[-1] = ("notARealTool", calls[-1][1])
    reward, feedback = ToolCallVerifier()(row["prompt"], _react(calls), row)
    assert reward == 0.0
    assert feedback.startswith("Actions mismatch: predicted [") and '"notARealTool"' in feedback
    assert f"expected {json.dumps([name for name, _ in _gold(row)])}" in feedback


WITH_ARGS = [row for row in TOOLUSE if any(args for _, args in _gold(row))]


@pytest.mark.parametrize("row", WITH_ARGS, ids=lambda row: str(row["idx"]))
def test_tool_call_real_rows_perturbed_input(row):
    calls = _gold(row)
    name, args = next((name, args) for name, args in reversed(calls) if args)
    key = sorted(args)[0]
    perturbed = [(n, {**a, key: "WRONG"} if a is args else a) for n, a in calls]
    reward, feedback = ToolCallVerifier()(row["prompt"], _react(perturbed), row)
    assert reward == 0.0
    assert feedback.startswith("Action Input mismatch for ") and '"WRONG"' in feedback and "expected {" in feedback


def test_tool_call_malformed_json_in_action_input():
    row = TOOLUSE[1]
    name, _ = _gold(row)[0]
    completion = _react([(name, "{'color': 'wild', 'size': 'medium'}")])
    reward, feedback = ToolCallVerifier()(row["prompt"], completion, row)
    assert reward == 0.0 and feedback.startswith("Action Input is not valid JSON: {'color'")
    truncated = f"Action: {name}\nAction Input: {{\"color\": \"wild\", "
    assert ToolCallVerifier()(row["prompt"], truncated, row)[1].startswith("Action Input is not valid JSON")


def test_tool_call_malformed_tool_call_block():
    row = TOOLUSE[0]
    completion = '<tool_call>{"name": "getRandomAxolotlImage", </tool_call>'
    reward, feedback = ToolCallVerifier()(row["prompt"], completion, row)
    assert reward == 0.0 and feedback.startswith("Tool call is not valid JSON")


def test_tool_call_multiset_order_and_duplicates():
    row = next(row for row in TOOLUSE if row["idx"] == 4063)  # checkIPReputation then reportAbusiveIP
    calls = _gold(row)
    assert ToolCallVerifier()(row["prompt"], _react(calls[::-1]), row).reward == 1.0
    reward, feedback = ToolCallVerifier()(row["prompt"], _react(calls + calls[:1]), row)
    assert reward == 0.0 and feedback.startswith("Actions mismatch")
    reward, feedback = ToolCallVerifier()(row["prompt"], _react(calls[:1]), row)
    assert reward == 0.0 and "Actions mismatch" in feedback


def test_tool_call_no_action_thinking_fences_and_hidden_answer():
    row = TOOLUSE[1]
    name, args = _gold(row)[0]
    assert ToolCallVerifier()(row["prompt"], "I cannot help.", row) == (
        0.0, f'Actions mismatch: predicted [], expected ["{name}"]'
    )
    thinking = "<think>\nMaybe:\nAction: getAxolotlFacts\nAction Input: {}\n</think>\n"
    assert ToolCallVerifier()(row["prompt"], thinking + _react([(name, args)]), row).reward == 1.0
    assert ToolCallVerifier(strip_thinking=False)(row["prompt"], thinking + _react([(name, args)]), row).reward == 0.0
    fenced = f"Action: `{name}`\nAction Input:\n```json\n{json.dumps(args, indent=2)}\n```\n"
    assert ToolCallVerifier()(row["prompt"], fenced, row).reward == 1.0
    hidden = ToolCallVerifier(reveal_answer=False)
    feedback = hidden(row["prompt"], _react([(name, {**args, "page": 7})]), row).feedback
    assert feedback.startswith(f"Action Input mismatch for {name}: predicted") and "expected" not in feedback


def test_tool_call_openai_style_gold_and_custom_field():
    record = {
        "gold": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
        ]
    }
    verify = ToolCallVerifier(answer_field="gold")
    good = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'
    )
    assert verify("q", good, record) == (1.0, None)
    react = _react([("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})])
    assert verify("q", react, record).reward == 1.0
    reward, feedback = verify("q", good.replace("Paris", "Rome"), record)
    assert reward == 0.0 and '"Rome"' in feedback and '"Paris"' in feedback
    calls = [
        {"name": "get_time", "arguments": {"tz": "CET"}},
        {"name": "get_weather", "arguments": {"city": "Paris"}},
    ]
    as_list = f"<tool_call>{json.dumps(calls)}</tool_call>"  # several calls in one block
    assert verify("q", as_list, record) == (1.0, None)


# ------------------------------------------------------------------------------------------ multiple choice
def _mc(letter: str) -> str:
    return f"<reasoning>\nThe product keeps the pyrazole ring.\n</reasoning>\n<answer>\n{letter}\n</answer>"


@pytest.mark.parametrize("row", CHEMISTRY, ids=lambda row: str(row["idx"]))
def test_multiple_choice_real_rows(row):
    verify = MultipleChoiceVerifier()
    messages = [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["prompt"]}]
    assert verify(messages, _mc(row["answer"]), row) == (1.0, None)
    assert verify(messages, _mc(row["answer"].lower()), row) == (1.0, None)
    wrong = "A" if row["answer"] != "A" else "B"
    reward, feedback = verify(messages, _mc(wrong), row)
    assert (reward, feedback) == (0.0, f"The answer {wrong} is incorrect.")
    assert row["answer"] not in feedback.replace(f"answer {wrong}", "")


def test_multiple_choice_missing_last_wins_invalid_and_options():
    row = CHEMISTRY[2]  # gold C
    verify = MultipleChoiceVerifier()
    assert verify("q", "The answer is C.", row) == (0.0, "No <answer>...</answer> block found")
    assert verify("q", "<answer>C", row) == (0.0, "No <answer>...</answer> block found")
    assert verify("q", _mc("A") + "\nOn reflection:\n" + _mc("C"), row).reward == 1.0
    assert verify("q", _mc("C") + "\nOn reflection:\n" + _mc("A"), row) == (0.0, "The answer A is incorrect.")
    assert verify("q", "<ANSWER> (c) </ANSWER>", row).reward == 1.0
    for bad in ("E", "CD", ""):
        reward, feedback = verify("q", _mc(bad), row)
        assert reward == 0.0 and feedback.startswith("The <answer> block must contain one letter out of A, B, C, D")
    assert verify("q", _mc("A"), row).feedback == "The answer A is incorrect."
    revealed = MultipleChoiceVerifier(reveal_answer=True)("q", _mc("A"), row).feedback
    assert revealed == "The answer A is incorrect. The correct answer is C."
    five = MultipleChoiceVerifier(choices="ABCDE", answer_field="label")
    assert five("q", _mc("E"), {"label": "e"}).reward == 1.0


# --------------------------------------------------------------------------------------------- boxed math
@pytest.mark.parametrize(
    "boxed, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{1}{2}", r"\frac12"),
        ("0.5", r"\frac{1}{2}"),
        (r"-\tfrac{3}{4}", "-0.75"),
        ("3/4", r"\frac{3}{4}"),
        ("1,000", 1000),
        ("1000", "1{,}000"),
        (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"5 \text{ cm}", "5"),
        (r"\text{(B)}", "(B)"),
        ("x = 3", "3"),
        (r"4\,200.", "4200"),
        ("0.3333333", r"\frac{1}{3}"),
        ("42", r"The answer is \boxed{42}"),
        (r"50\%", "50"),
    ],
)
def test_boxed_math_equivalent(boxed, gold):
    completion = rf"We compute step by step. So the result is $\boxed{{{boxed}}}$."
    assert BoxedMathVerifier()("q", completion, {"answer": gold}) == (1.0, None)


@pytest.mark.parametrize(
    "boxed, gold", [("0.33", r"\frac{1}{3}"), (r"\frac{1}{2}", "0.25"), ("1,000", "100"), ("x+1", "x-1")]
)
def test_boxed_math_wrong(boxed, gold):
    reward, feedback = BoxedMathVerifier()("q", rf"\boxed{{{boxed}}}", {"answer": gold})
    assert reward == 0.0 and feedback == f"The answer {boxed} is incorrect."


def test_boxed_math_last_box_missing_box_and_reveal():
    verify = BoxedMathVerifier()
    assert verify("q", r"First \boxed{3}, then correcting: \boxed{\frac{1}{2}}", {"answer": "1/2"}).reward == 1.0
    assert verify("q", r"First \boxed{1/2}, then: \boxed{3}", {"answer": "1/2"}).reward == 0.0
    assert verify("q", "The answer is 1/2.", {"answer": "1/2"}) == (0.0, "No \\boxed{...} answer found")
    assert verify("q", r"\boxed{\frac{1}{2}", {"answer": "1/2"}) == (0.0, "No \\boxed{...} answer found")
    assert verify("q", r"\boxed 7", {"answer": "7"}).reward == 1.0
    assert BoxedMathVerifier(reveal_answer=True)("q", r"\boxed{3}", {"answer": "1/2"}).feedback.endswith("is 1/2.")
    assert BoxedMathVerifier(answer_field="solution")("q", r"\boxed{2}", {"solution": 2}).reward == 1.0


# ------------------------------------------------------------------------------------------- python tests
ADD_TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(0, 0) == 0"]}


def _py(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nIt runs in O(1)."


def test_python_tests_pass_and_second_of_three_fails():
    verify = PythonTestsVerifier()
    good = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]}
    assert verify("q", _py("def add(a, b):\n    return a + b"), good) == (1.0, None)
    reward, feedback = verify("q", _py("def add(a, b):\n    return a + b"), ADD_TESTS)
    assert reward == 0.0
    assert feedback == "Test 2 of 3 failed: assert add(2, 2) == 5\nAssertionError"
    partial = PythonTestsVerifier(partial_credit=True)("q", _py("def add(a, b):\n    return a + b"), ADD_TESTS)
    assert partial.reward == pytest.approx(2 / 3) and partial.feedback.startswith("Test 2 of 3 failed")


def test_python_tests_code_extraction_and_test_formats():
    verify = PythonTestsVerifier()
    two_blocks = _py("def add(a, b):\n    return a - b") + "\nFixed:\n" + _py("def add(a, b):\n    return a + b")
    record = {"tests": ["assert add(1, 2) == 3"]}
    assert verify("q", two_blocks, record).reward == 1.0
    assert verify("q", "def add(a, b):\n    return a + b\n", record).reward == 1.0
    assert verify("q", "```python\ndef add(a, b):\n    return a + b\n", record).reward == 1.0  # unterminated fence
    script = {"tests": "assert add(1, 2) == 3\nassert add(1, 1) == 2\n"}
    assert verify("q", _py("def add(a, b):\n    return a + b"), script).reward == 1.0
    as_json = {"tests": json.dumps(["assert add(1, 2) == 3", "assert add(1, 1) == 3"])}
    assert verify("q", _py("def add(a, b):\n    return a + b"), as_json).feedback.startswith("Test 2 of 2 failed")
    reward, feedback = verify("q", _py("def add(a, b) return a + b"), record)
    assert reward == 0.0 and feedback.startswith("Solution raised SyntaxError")
    reward, feedback = verify("q", _py("def add(a, b):\n    return a + b\nraise SystemExit(3)"), record)
    assert reward == 0.0 and feedback.startswith("Solution raised SystemExit")
    exits = verify("q", _py("def add(a, b):\n    return a + b"), {"tests": ["import sys\nsys.exit(0)"]})
    assert exits == (0.0, "Test 1 of 1 failed: import sys\nsys.exit(0)\nSystemExit: 0")  # any exit fails a test
    reward, feedback = verify("q", _py("def add(a, b):\n    raise ValueError('x' * 2000)"), record)
    assert reward == 0.0 and len(feedback) <= 300 and "ValueError: xxx" in feedback
    with pytest.raises(ValueError, match="no tests"):
        verify("q", _py("x = 1"), {"tests": []})


def test_python_tests_stdin_stdout_tests_as_livecodebench_compares_them():
    verify = PythonTestsVerifier(partial_credit=True)
    cases = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}, {"input": "0.5 0.25", "output": "0.75"},
             {"input": "5 5\n", "output": "10"}]
    as_json = {"tests": json.dumps(cases)}  # LiveCodeBench's public_test_cases: a JSON string
    for reader in ("input()", "sys.stdin.readline()", "sys.stdin.buffer.read().decode()", "open(0).read()"):
        program = f"import sys\na, b = map(float, {reader}.split())\nprint(f'{{a + b:g}}')"
        assert verify("q", _py(program), as_json) == (1.0, None), reader
    # Lines are stripped and compared as text, or as numbers ("10.0" = "10"); the line count must match.
    assert stdio_mismatch("  3 \n4\n\n", "3\n4") is None and stdio_mismatch("10.0 2", "10 2.00") is None
    assert stdio_mismatch("3\n4", "3") == "Wrong answer: 2 output lines, expected 1: got '3\\n4'"
    assert stdio_mismatch("yes", "YES") == "Wrong answer on line 1: got 'yes', expected 'YES'"
    assert stdio_mismatch("sNaN", "sNaN") is None and stdio_mismatch("sNaN", "1") is not None
    # exit() ends the program and its output counts (as LiveCodeBench); an exception fails the test.
    assert verify("q", _py("print(int(input()) * 2)\nexit(3)"), {"tests": [{"input": "5", "output": "10"}]}) == (
        1.0, None)
    reward, feedback = verify("q", _py("a, b = input().split()\nprint(int(a) + int(b))"), as_json)
    assert reward == pytest.approx(2 / 3)
    assert feedback == "Test 2 of 3 failed: input '0.5 0.25'\nRuntime error: ValueError: invalid literal for " \
                       "int() with base 10: '0.5'", feedback
    reward, feedback = verify("q", _py("def main(:\n    pass"), as_json)
    assert reward == 0.0 and feedback.startswith("Test 1 of 3 failed: input '1 2\\n'\nRuntime error: SyntaxError")


def test_python_tests_stdin_stdout_limits_and_bad_records():
    loop = "import sys\nif sys.stdin.read().strip() == 'loop':\n    while True:\n        pass\nprint('ok')"
    cases = {"tests": [{"input": "loop", "output": "ok"}, {"input": "go", "output": "ok"}]}
    start = time.monotonic()
    verify = PythonTestsVerifier(partial_credit=True, timeout=10, call_timeout=1)
    assert verify("q", _py(loop), cases) == (0.5, "Test 1 of 2 failed: input 'loop'\nTimed out after 1 s")
    assert time.monotonic() - start < 1 + 4
    big = PythonTestsVerifier(file_mb=1)("q", _py("print('x' * (4 << 20))"), {"tests": [{"input": "", "output": ""}]})
    assert big == (0.0, "Test 1 of 1 failed: input ''\nRuntime error: OSError: [Errno 27] File too large"), big
    verify = PythonTestsVerifier()
    with pytest.raises(ValueError, match=r"record\['tests'\]\[0\] is a 'functional' test"):
        verify("q", "", {"tests": [{"input": "1", "output": "1", "testtype": "functional"}]})
    with pytest.raises(ValueError, match=r"record\['tests'\]\[1\] needs an 'input' and an 'output' string"):
        verify("q", "", {"tests": [{"input": "1", "output": "1"}, {"input": "1", "output": 1}]})
    with pytest.raises(ValueError, match="mixes code tests and stdin/stdout tests"):
        verify("q", "", {"tests": ["assert True", {"input": "1", "output": "1"}]})


def test_python_tests_expected_outputs_never_enter_the_sandbox():
    """The program can search its whole memory and the file system: the expected output is not there to copy."""
    program = ("import gc, sys\nfound = [text for obj in gc.get_objects() if isinstance(obj, (list, tuple, dict))\n"
               "         for text in (obj.values() if isinstance(obj, dict) else obj)\n"
               "         if isinstance(text, str) and text[:7] == 'SECRET-' and text[7:].isdigit()]\n"
               "frame = sys._getframe()\nwhile frame is not None:\n"
               "    found += [v for v in frame.f_locals.values() if isinstance(v, str) and v[:7] == 'SECRET-' and v[7:].isdigit()]\n"
               "    frame = frame.f_back\nprint(found[0] if found else 'nothing')")
    reward, feedback = PythonTestsVerifier()("q", _py(program), {"tests": [{"input": "", "output": "SECRET-4217"}]})
    assert reward == 0.0 and "got 'nothing'" in feedback, feedback


def test_python_tests_infinite_loop_times_out_within_bound():
    verify = PythonTestsVerifier(timeout=1.0)
    start = time.monotonic()
    result = verify("q", _py("def add(a, b):\n    while True:\n        pass"), ADD_TESTS)
    elapsed = time.monotonic() - start
    assert result == (0.0, "Timed out after 1 s")
    assert elapsed < 1.0 + 2.0
    sleeper = verify("q", _py("import time\ntime.sleep(60)"), ADD_TESTS)  # not CPU-bound: the wall clock stops it
    assert sleeper == (0.0, "Timed out after 1 s")


def test_python_tests_fork_bomb_and_subprocesses_are_contained():
    verify = PythonTestsVerifier(timeout=2.0)
    start = time.monotonic()
    for code in (
        "import os\nwhile True:\n    os.fork()",
        "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import os\nos.system('sleep 100 &')",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import os\nos.kill(os.getppid(), 0)",
    ):
        reward, feedback = verify("q", _py(code + "\ndef add(a, b):\n    return a + b"), ADD_TESTS)
        assert reward == 0.0 and feedback.startswith("Solution raised"), (code, feedback)
    assert time.monotonic() - start < 6 * 2.0
    assert os.getpid() > 0  # still here


def test_python_tests_process_limit_applies_after_dropping_root():
    """With uid 65534 (root running a world-readable python), RLIMIT_NPROC caps threads and processes too."""
    pythons = [p for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)]
    python = next((p for p in pythons if os.geteuid() == 0 and sandbox_mode(p)["uid"] == 65534), None)
    if python is None:
        pytest.skip("needs root and a python that uid 65534 can run")
    code = (
        "import threading, time\nthreading.stack_size(1 << 18)\nstarted = 0\n"
        "try:\n    for _ in range(500):\n"
        "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "        started += 1\nexcept RuntimeError:\n    pass"
    )
    record = {"tests": ["assert started < 32, started"]}
    assert PythonTestsVerifier(python=python, max_processes=32)("q", _py(code), record) == (1.0, None)


def test_python_tests_network_is_blocked():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        verify = PythonTestsVerifier(timeout=3.0)
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
        reward, feedback = verify("q", _py(code), ADD_TESTS)
        assert reward == 0.0 and "network access is disabled" in feedback
        code = f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"
        assert verify("q", _py(code), ADD_TESTS).reward == 0.0
        if "namespace" in sandbox_mode()["network"]:  # even the raw socket module cannot reach the host
            code = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))"
            reward, feedback = verify("q", _py(code), ADD_TESTS)
            assert reward == 0.0 and feedback.startswith("Solution raised OSError"), feedback
    finally:
        server.close()


def test_python_tests_memory_output_and_file_limits():
    verify = PythonTestsVerifier(memory_mb=512, file_mb=4)
    reward, feedback = verify("q", _py("x = bytearray(2 << 30)"), ADD_TESTS)
    assert reward == 0.0 and feedback.startswith("Solution raised MemoryError")
    chatty = _py("print('x' * (64 << 20))\ndef add(a, b):\n    return a + b")  # stdout is discarded, not limited
    assert verify("q", chatty, {"tests": ["assert add(1, 2) == 3"]}).reward == 1.0
    reward, feedback = verify("q", _py("open('big.bin', 'wb').write(b'x' * (8 << 20))"), ADD_TESTS)
    assert reward == 0.0 and "File too large" in feedback
    escaped = verify("q", _py("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"), ADD_TESTS)
    assert escaped.reward == 0.0 and "PermissionError" in escaped.feedback


def test_sandbox_mode_reports_network_block():
    mode = sandbox_mode()
    assert mode["network"] in ("socket patch only", "namespace (unshare -n) + socket patch",
                               "namespace (unshare -r -n) + socket patch")
    assert isinstance(mode["uid"], int)


def test_sandbox_without_unshare_falls_back_loudly_or_refuses_read_all(monkeypatch, caplog):
    """No unshare: no private view. A fallback warns with what is exposed; as root with a Python that uid 65534
    cannot read (this machine: /root/.pyenv), the only modes left read every file, and are refused by default."""
    monkeypatch.setattr(sandbox, "_SANDBOX_SETUP", {})
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    kwargs = {}
    with caplog.at_level(logging.WARNING, logger="sd_plugin.verifiers"):
        try:
            mode = sandbox_mode()
        except SandboxUnavailable as exc:
            assert os.geteuid() == 0 and "allow_read_all_files" in str(exc) and "`unshare` not found" in str(exc)
            with pytest.raises(SandboxUnavailable):
                load_verifier("python_tests")  # at load, before any training step
            kwargs = {"allow_read_all_files": True}
            mode = sandbox_mode(**kwargs)
    assert mode["network"] == "socket patch only" and not mode["private_files"]
    assert "NO private file-system view here (`unshare` not found)" in caplog.text and "AF_UNIX" in caplog.text
    code = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\ndef add(a, b):\n    return a + b"
    reward, feedback = PythonTestsVerifier(**kwargs)("q", _py(code), ADD_TESTS)
    assert reward == 0.0 and "network access is disabled" in feedback
    good = _py("def add(a, b):\n    return a + b")
    assert PythonTestsVerifier(**kwargs)("q", good, {"tests": ["assert add(1, 2) == 3"]}).reward == 1.0


# ------------------------------------------------------------------------------------- loading, protocol
def test_load_verifier_builtins_and_dotted_paths(tmp_path, monkeypatch):
    assert set(BUILTIN_VERIFIERS) == {"tool_calls", "tool_call", "multiple_choice", "boxed_math", "python_tests"}
    verify = load_verifier("multiple_choice", {"choices": "ABCDE", "reveal_answer": True})
    assert isinstance(verify, MultipleChoiceVerifier) and verify.choices == "ABCDE" and verify.reveal_answer
    assert isinstance(load_verifier("python_tests", {"timeout": 2}), PythonTestsVerifier)
    assert isinstance(load_verifier("sd_plugin.verifiers:BoxedMathVerifier"), BoxedMathVerifier)
    dotted = load_verifier("sd_plugin.verifiers.ToolCallVerifier", {"answer_field": "gold"})
    assert isinstance(dotted, ToolCallVerifier) and dotted.answer_field == "gold"
    (tmp_path / "my_verifiers.py").write_text(
        "def contains(prompt, completion, record, word='yes'):\n"
        "    return float(word in completion), None\n"
        "class Scorer:\n"
        "    def __init__(self, bonus=0.0):\n        self.bonus = bonus\n"
        "    def __call__(self, prompt, completion, record):\n        return 0.5 + self.bonus, 'half'\n"
        "    class Nested:\n        def __call__(self, prompt, completion, record):\n            return 1.0\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_verifier("my_verifiers:contains")("q", "yes!", {}) == (1.0, None)
    assert load_verifier("my_verifiers.contains", {"word": "no"})("q", "yes!", {}) == (0.0, None)
    assert load_verifier("my_verifiers:Scorer", {"bonus": 0.25})("q", "c", {}) == (0.75, "half")
    assert load_verifier("my_verifiers:Scorer.Nested")("q", "c", {}) == 1.0
    direct = ToolCallVerifier()
    assert load_verifier(direct) is direct
    assert isinstance(direct, Verifier) and isinstance(BoxedMathVerifier(), Verifier)

    with pytest.raises(ValueError, match="'nonsense'"):
        load_verifier("nonsense")
    with pytest.raises(ImportError, match="'no_such_package_xyz.mod:verify'"):
        load_verifier("no_such_package_xyz.mod:verify")
    with pytest.raises(ImportError, match="'my_verifiers:missing'.*no attribute"):
        load_verifier("my_verifiers:missing")
    with pytest.raises(TypeError, match="'my_verifiers:NOT_CALLABLE' is not callable"):
        load_verifier("my_verifiers:NOT_CALLABLE")
    with pytest.raises(TypeError, match="'multiple_choice' with kwargs"):
        load_verifier("multiple_choice", {"no_such_option": 1})


def test_safe_verify_never_raises_and_logs_row(caplog):
    row = CHEMISTRY[0]

    def boom(prompt, completion, record):
        raise KeyError("answer")

    with caplog.at_level(logging.WARNING, logger="sd_plugin.verifiers"):
        assert safe_verify(boom, "q", "c", row, row=7) == VerifierResult(0.0, None)
    assert "row 7" in caplog.text and "KeyError" in caplog.text and "boom" in caplog.text
    caplog.clear()
    for bad in (math.nan, math.inf, -math.inf, "1.0", None, object(), (1.0, "a", "b")):
        with caplog.at_level(logging.WARNING, logger="sd_plugin.verifiers"):
            assert safe_verify(lambda p, c, r, out=bad: out, "q", "c", row, row=3) == (0.0, None)
        assert "row 3" in caplog.text and "invalid reward" in caplog.text
        caplog.clear()
    assert safe_verify(lambda p, c, r: 1, "q", "c", row) == (1.0, None)
    assert safe_verify(lambda p, c, r: True, "q", "c", row) == (1.0, None)
    assert safe_verify(lambda p, c, r: (0.5, ""), "q", "c", row) == (0.5, None)
    assert safe_verify(lambda p, c, r: [0.5, 42], "q", "c", row) == (0.5, "42")
    assert safe_verify(MultipleChoiceVerifier(), "q", _mc(row["answer"]), row) == (1.0, None)
    result = safe_verify(MultipleChoiceVerifier(), "q", _mc(row["answer"]), {"no_answer": 1}, row=11)
    assert result == (0.0, None) and "row 11" in caplog.text and "MultipleChoiceVerifier" in caplog.text
    assert isinstance(result, VerifierResult) and type(result.reward) is float


def test_verify_in_threads_is_independent():
    """Rollouts are often scored from a thread pool: concurrent sandboxes must not mix up results."""
    verify = PythonTestsVerifier()
    results = {}

    def work(i):
        code = _py(f"def add(a, b):\n    return a + b + {i % 2}")
        results[i] = verify("q", code, {"tests": ["assert add(1, 2) == 3"]})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i].reward for i in range(4)] == [1.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------ hostile code cannot hang or kill the run
# Code that gets past the Python-level block (it re-imports ctypes and calls libc's fork) meets the kernel's
# limits: RLIMIT_NPROC (uid 65534) and the sandbox's PID namespace. Every case below is bounded by itself
# (a fixed number of forks, children that exit on their own) except the fork bomb, which runs only once the
# bounded case has shown that the process limit holds here.
BYPASS_PREAMBLE = (
    "import sys, time\nfor name in ('ctypes', '_ctypes'):\n    sys.modules.pop(name, None)\n"
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
)


class _ProcessWatch:
    """Counts this machine's processes named `name` (as /proc/PID/comm shows them) from a background thread.

    Sandboxed code names its processes with prctl(PR_SET_NAME): the name is visible from outside the private
    /tmp and the PID namespace, so it shows that they ran and that none is left.
    """

    def __init__(self, name: str):
        self.name, self.most, self.running = name, 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def count(self) -> int:
        count = 0
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    count += pid.isdigit() and f.read().strip() == self.name
            except OSError:
                pass
        return count

    def _poll(self):
        while self.running:
            self.most = max(self.most, self.count())
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def all_gone(self, within: float = 2.0) -> bool:
        deadline = time.monotonic() + within
        while self.count() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.count() == 0


def _name_processes(name: str) -> str:
    return f"libc.prctl(15, {name.encode()!r}, 0, 0, 0)  # PR_SET_NAME\n"


def test_python_tests_children_that_leave_the_process_group_die_with_the_sandbox():
    if not sandbox_mode()["pid_namespace"]:
        pytest.skip("no PID namespace here (unshare -p): a child that calls setsid() outlives the sandbox")
    name = f"sdleave{os.getpid() % 100000}"
    code = BYPASS_PREAMBLE + (
        "for _ in range(3):\n"
        "    if libc.fork() == 0:\n"
        "        libc.setsid()  # out of the process group that the timeout kills\n"
        f"        {_name_processes(name)}"
        "        time.sleep(20)  # bounded\n"
        "        libc._exit(0)\n"
        "while True:\n    pass\n"
    )
    with _ProcessWatch(name) as watch:
        start = time.monotonic()
        assert PythonTestsVerifier(timeout=2.0)("q", _py(code), ADD_TESTS) == (0.0, "Timed out after 2 s")
        assert time.monotonic() - start < 2.0 + 2.0
    assert watch.most > 0, "the children never ran: the test proves nothing"
    assert watch.all_gone(), "a child of the sandbox is still running"


def _bounded_forks(max_processes: int) -> VerifierResult:
    """RLIMIT_NPROC counts every process of the sandbox's uid (65534) on the machine, so sandboxed jobs of the other
    xdist worker can use the whole budget for a moment and the first fork fails: try again a few times, and skip
    when the budget stays taken."""
    code = BYPASS_PREAMBLE + (
        "forked = 0\nfor _ in range(40):\n    pid = libc.fork()\n"
        "    if pid == 0:\n        time.sleep(30)\n        libc._exit(0)\n"
        "    if pid < 0:\n        break\n    forked += 1\n"
    )
    record = {"tests": [f"assert 1 <= forked < {max_processes}, forked"]}
    for _ in range(10):
        result = PythonTestsVerifier(timeout=3.0, max_processes=max_processes)("q", _py(code), record)
        if result != (0.0, "AssertionError: 0"):
            return result
        time.sleep(1.0)
    pytest.skip("other processes of uid 65534 held the whole process budget for 10 tries: no fork possible")


def test_python_tests_process_limit_caps_forks_that_bypass_the_python_block():
    if not sandbox_mode()["process_limit"]:
        pytest.skip("the sandbox runs as root here: the kernel does not enforce RLIMIT_NPROC")
    assert _bounded_forks(max_processes=8) == (1.0, None)


def test_python_tests_fork_bomb_is_contained_and_leaves_nothing_behind():
    mode = sandbox_mode()
    if not (mode["process_limit"] and mode["pid_namespace"]):
        pytest.skip("needs RLIMIT_NPROC enforced and a PID namespace to run a real fork bomb safely")
    assert _bounded_forks(max_processes=8) == (1.0, None), "the process limit does not hold: no fork bomb"
    name = f"sdbomb{os.getpid() % 100000}"
    code = BYPASS_PREAMBLE + _name_processes(name) + "while True:\n    libc.fork()\n"
    with _ProcessWatch(name) as watch:
        start = time.monotonic()
        reward, feedback = PythonTestsVerifier(timeout=2.0, max_processes=16)("q", _py(code), ADD_TESTS)
        assert reward == 0.0 and feedback == "Timed out after 2 s"
        assert time.monotonic() - start < 2.0 + 2.0
    assert watch.most > 1, "the fork bomb never forked: the test proves nothing"
    assert watch.all_gone(), "a process of the fork bomb is still running"


@pytest.mark.parametrize(
    "code,expected",
    [
        ("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))", "Solution raised MemoryError"),
        ("chunks = []\nwhile True:\n    chunks.append('x' * (8 << 20))", "Solution raised MemoryError"),
        ("chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(32 << 20))\nexcept MemoryError:\n"
         "    while True:\n        pass", "Timed out after 4 s"),
        ("import threading\nhog = lambda: bytearray(1 << 31)\nthreading.Thread(target=hog).start()\n"
         "def add(a, b):\n    return a + b", None),
    ],
    ids=["bytearrays", "strings", "hog-then-spin", "hog-in-a-thread"],
)
def test_python_tests_memory_hogs_hit_the_limit_not_the_machine(code, expected):
    start = time.monotonic()
    # 4 s: filling 256 MB takes a loaded 2-core machine (two sandboxes, other jobs) up to about 2 s.
    reward, feedback = PythonTestsVerifier(timeout=4.0, memory_mb=256)("q", _py(code), ADD_TESTS)
    assert time.monotonic() - start < 4.0 + 2.0
    assert reward == 0.0
    if expected is None:  # the thread's MemoryError stays in the thread; the tests then run and one fails
        assert feedback.startswith("Test 2 of 3 failed"), feedback
    else:
        assert feedback == expected, feedback


def test_hostile_code_cannot_hang_or_kill_an_sdpo_training_run(tmp_path, tokenizer):
    """One SDPO step whose rollouts are an infinite loop, a fork bomb, a memory hog, attempts to kill the
    trainer, and one correct solution: the step finishes, the bad ones get reward 0 with feedback."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from sd_plugin import SDPOConfig, SDPOTrainer
    from sd_plugin import rows as rows_module
    from sd_plugin.rollout import Rollouts
    from sd_plugin.testing import build_model

    completions = [
        _py("def add(a, b):\n    while True:\n        pass"),
        _py("import os\nwhile True:\n    os.fork()"),
        _py("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))"),
        _py("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"),
        _py("import os, signal\nos.killpg(0, signal.SIGKILL)"),
        _py("def add(a, b):\n    return a + b"),
    ]

    def hostile_rollouts(self, model, prompt_ids, prompt_mask):
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in completions]
        ids, mask = rows_module.right_pad(ids, tokenizer.pad_token_id)
        groups = torch.arange(prompt_ids.shape[0]).repeat_interleave(self.options.num_generations)
        return Rollouts(ids, mask, groups, torch.zeros(len(completions), dtype=torch.bool))

    rows = Dataset.from_list([{"prompt": f"Write add(a, b) in Python ({i}).", "tests": ["assert add(1, 2) == 3"]} for i in range(2)])
    args = SDPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=1, logging_steps=1,
                      max_completion_length=64, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                      num_generations=3, verifier="python_tests", verifier_kwargs={"timeout": 4, "memory_mb": 256})
    trainer = SDPOTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=rows, processing_class=tokenizer,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    scored = []
    real_score = trainer.score_rollouts
    trainer.score_rollouts = lambda inputs, batch: (real_score(inputs, batch), scored.append(batch.verdicts))[0]
    trainer.sample = hostile_rollouts.__get__(trainer)
    start = time.monotonic()
    result = trainer.train()
    assert result.global_step == 1 and time.monotonic() - start < 6 * (4 + 2) + 30
    (verdicts,) = scored
    feedback = [verdict.feedback for verdict in verdicts]
    assert [verdict.reward for verdict in verdicts] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert feedback[0] == "Timed out after 4 s"
    assert feedback[1].startswith("Solution raised PermissionError")
    assert feedback[2] == "Solution raised MemoryError"
    assert feedback[3].startswith("Solution raised PermissionError") and feedback[4].startswith("Solution raised PermissionError")
    assert os.getpid() > 0  # this process (the trainer) is alive
