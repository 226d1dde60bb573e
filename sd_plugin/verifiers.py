"""Verifiers: score one completion and optionally explain what went wrong (SDPO feedback, SD-Zero rewards).

A verifier is any callable ``verify(prompt, completion, record) -> (reward, feedback)``: ``prompt`` is the
prompt (str or chat messages), ``completion`` the decoded completion text, ``record`` the dataset row (the
gold answer is in it, e.g. ``record["answer"]``); ``reward`` is a float and ``feedback`` a str or None.

Built-ins (`load_verifier` names): "tool_calls" (alias "tool_call"), "multiple_choice", "boxed_math", "python_tests".

`PythonTestsVerifier` runs model code in the sandbox of `sd_plugin.sandbox` (a separate program,
`sandbox_runner.py`): where ``unshare -m`` works, a private view of the file system (no /root, /home, /tmp of
the machine), no network, its own PID namespace, uid 65534 without capabilities, rlimits. `sandbox_mode()`
says what is in use here. The tests run in another process (the harness) that never runs model code and gets
plain data back from the solution, so nothing the solution does to its own process changes a verdict; see the
README for what is still possible and what such tests cannot express.
"""

from __future__ import annotations

import base64
import functools
import importlib
import inspect
import json
import logging
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Mapping, NamedTuple, Protocol, runtime_checkable

from sd_plugin.data import completion_text
from sd_plugin.sandbox import (
    SandboxUnavailable,
    make_job,
    run_sandbox,
    run_with_harness,
    sandbox_mode,
    sandbox_setup,
)
from sd_plugin.sandbox_runner import STOPPED

logger = logging.getLogger("sd_plugin.verifiers")

__all__ = [
    "BUILTIN_VERIFIERS", "BoxedMathVerifier", "MultipleChoiceVerifier", "PythonTestsVerifier", "SandboxUnavailable",
    "TRLRewardFunctions", "ToolCallVerifier", "Verifier", "VerifierResult", "extract_code", "last_boxed",
    "load_verifier", "normalize_math", "safe_verify", "sandbox_mode", "sandbox_setup", "stdio_mismatch",
]


class VerifierResult(NamedTuple):
    """A verifier's verdict: ``reward`` (float) and optional text ``feedback`` for the teacher's context."""

    reward: float
    feedback: str | None


@runtime_checkable
class Verifier(Protocol):
    """Any callable ``(prompt, completion, record) -> (reward, feedback)``; see the module docstring."""

    def __call__(
        self, prompt: str | list[dict[str, Any]], completion: str, record: Mapping[str, Any]
    ) -> tuple[float, str | None]: ...


def _short(text: Any, limit: int = 300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------- tool calls
_REACT_ACTION = re.compile(r"^[ \t*]*Action[ \t*]*:[ \t*]*(.*?)[ \t*]*$", re.M)
_REACT_INPUT = re.compile(r"^[ \t*]*Action[ \t]+Input[ \t*]*:", re.M)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)


def _json_prefix(text: str) -> Any:
    """Decode the JSON value at the start of ``text`` (after an optional ``` fence line); raises ValueError."""
    text = text.lstrip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return json.JSONDecoder().raw_decode(text.lstrip())[0]


def _as_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _gold_calls(gold: Any) -> list[tuple[str, Any]]:
    """(name, arguments) pairs from ReAct-style ``{"Action", "Action_Input"}`` or OpenAI-style tool_calls."""
    gold = _as_json(gold)
    calls = []
    for entry in [gold] if isinstance(gold, dict) else gold:
        if "Action" in entry:
            calls.append((entry["Action"], _as_json(entry.get("Action_Input", {}))))
        else:
            function = entry.get("function", entry)
            calls.append((function["name"], _as_json(function.get("arguments", function.get("parameters", {})))))
    return calls


def _predicted_calls(text: str) -> tuple[list[str], list[Any], str | None]:
    """Action names, inputs and the first parse error, from ReAct blocks and ``<tool_call>`` JSON blocks."""
    events = [(m.start(), "name", m.group(1)) for m in _REACT_ACTION.finditer(text)]
    events += [(m.start(), "input", text[m.end():]) for m in _REACT_INPUT.finditer(text)]
    events += [(m.start(), "tool_call", m.group(1)) for m in _TOOL_CALL.finditer(text)]
    names, inputs = [], []
    for _, kind, payload in sorted(events):
        if kind == "name":
            names.append(payload.strip("`'\" "))
            continue
        try:
            if kind == "input":
                inputs.append(_json_prefix(payload))
                continue
            calls = json.loads(payload.strip())
            for call in calls if isinstance(calls, list) else [calls]:
                names.append(call["name"])
                inputs.append(_as_json(call.get("arguments", call.get("parameters", {}))))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            what = "Action Input" if kind == "input" else "Tool call"
            snippet = payload.strip().split("\n", 1)[0]
            return names, inputs, f"{what} is not valid JSON: {_short(snippet, 200)} ({_short(exc, 100)})"
    return names, inputs, None


def _merge(inputs: list[Any]) -> Any:
    """Dicts merged in order (later keys win); when any input is not a JSON object, the list itself."""
    if not all(isinstance(value, dict) for value in inputs):
        return inputs
    merged: dict[str, Any] = {}
    for value in inputs:
        merged.update(value)
    return merged


@dataclass
class ToolCallVerifier:
    """Exact match of tool calls (the SDPO / SDFT tool-use benchmark's rule).

    Predicted calls are ``Action: NAME`` lines each followed by ``Action Input: {json}`` (ReAct) and/or
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen / Hermes chat templates).
    Gold ``record[answer_field]`` is a JSON string or list of ``{"Action": name, "Action_Input": json}`` or
    of OpenAI-style tool calls ``{"function": {"name": ..., "arguments": {...} or json string}}``.
    Reward 1.0 iff the multiset of names equals the gold's and the inputs merged in order (dicts updated
    one after the other) equal the gold's merged inputs; else 0.0 with feedback. Text up to the last
    ``</think>`` is ignored when ``strip_thinking``. ``reveal_answer`` puts the expected calls in feedback.
    """

    answer_field: str = "answer"
    reveal_answer: bool = True
    strip_thinking: bool = True

    def __call__(self, prompt: Any, completion: str, record: Mapping[str, Any]) -> VerifierResult:
        gold = _gold_calls(record[self.answer_field])
        if self.strip_thinking and "</think>" in completion:
            completion = completion.rsplit("</think>", 1)[1]
        names, inputs, error = _predicted_calls(completion)
        if error is not None:
            return VerifierResult(0.0, error)
        gold_names = [name for name, _ in gold]
        if Counter(names) != Counter(gold_names):
            expected = f", expected {json.dumps(gold_names)}" if self.reveal_answer else ""
            return VerifierResult(0.0, f"Actions mismatch: predicted {_short(json.dumps(names))}{expected}")
        predicted, expected = _merge(inputs), _merge([args for _, args in gold])
        if predicted != expected:
            which = ", ".join(dict.fromkeys(gold_names))
            message = f"Action Input mismatch for {which}: predicted {_short(json.dumps(predicted))}"
            if self.reveal_answer:
                message += f", expected {_short(json.dumps(expected))}"
            return VerifierResult(0.0, message)
        return VerifierResult(1.0, None)


# ------------------------------------------------------------------------------------------ multiple choice
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)


@dataclass
class MultipleChoiceVerifier:
    """The letter inside the LAST ``<answer>...</answer>`` block equals ``record[answer_field]``.

    Whitespace, surrounding parentheses and a trailing period are stripped; comparison is
    case-insensitive; ``choices`` lists the valid letters. Feedback never contains the gold letter unless
    ``reveal_answer``.
    """

    answer_field: str = "answer"
    choices: str = "ABCD"
    reveal_answer: bool = False

    def __call__(self, prompt: Any, completion: str, record: Mapping[str, Any]) -> VerifierResult:
        gold = str(record[self.answer_field]).strip().upper()
        blocks = _ANSWER_TAG.findall(completion)
        if not blocks:
            return VerifierResult(0.0, "No <answer>...</answer> block found")
        letter = blocks[-1].strip().strip("().").strip().upper()
        if len(letter) != 1 or letter not in self.choices.upper():
            got, options = _short(blocks[-1].strip(), 80), ", ".join(self.choices.upper())
            return VerifierResult(0.0, f"The <answer> block must contain one letter out of {options}, got {got!r}.")
        if letter == gold:
            return VerifierResult(1.0, None)
        reveal = f" The correct answer is {gold}." if self.reveal_answer else ""
        return VerifierResult(0.0, f"The answer {letter} is incorrect.{reveal}")


# --------------------------------------------------------------------------------------------- boxed math
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces) or ``\\boxed x``; None when there is none."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    if not text.startswith("{", start):
        token = re.match(r"[^\s$]+", text[start:])
        return token.group(0) if token else None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    return None


def normalize_math(answer: str) -> str:
    """Canonical string form of a LaTeX answer (spacing, \\left/\\right, \\dfrac, degrees, units, ...)."""
    s = str(answer).strip().replace("\u2212", "-")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "\\%", "%", "°"):
        s = s.replace(token, "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    without_unit = re.sub(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}\s*$", "", s).strip()
    s = without_unit or s
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]=", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    return s.replace("{,}", ",")


def _as_number(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, ``1,000``-style, ``a/b`` or ``\\frac{a}{b}`` string, else None."""
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?", s):
        s = s.replace(",", "")
    frac = re.fullmatch(rf"([-+]?)\\frac\{{({_NUMBER})\}}\{{({_NUMBER})\}}", s)
    frac = frac or re.fullmatch(rf"()({_NUMBER})/({_NUMBER})", s)
    try:
        if frac:
            value = Fraction(frac.group(2)) / Fraction(frac.group(3))
            return -value if frac.group(1) == "-" else value
        return Fraction(s) if re.fullmatch(_NUMBER, s) else None
    except (ValueError, ZeroDivisionError):
        return None


@dataclass
class BoxedMathVerifier:
    """The last ``\\boxed{...}`` of the completion equals ``record[answer_field]`` (itself boxed or not).

    Both sides go through `normalize_math`; if both are numbers (integers, decimals, ``1,000``, ``a/b``,
    ``\\frac{a}{b}``) they are compared with tolerance ``rel_tol * max(1, |gold|)``, else as normalised strings.
    No sympy. Feedback never contains the gold answer unless ``reveal_answer``.
    """

    answer_field: str = "answer"
    rel_tol: float = 1e-6
    reveal_answer: bool = False

    def __call__(self, prompt: Any, completion: str, record: Mapping[str, Any]) -> VerifierResult:
        raw_gold = str(record[self.answer_field])
        gold = normalize_math(last_boxed(raw_gold) or raw_gold)
        boxed = last_boxed(completion)
        if boxed is None:
            return VerifierResult(0.0, "No \\boxed{...} answer found")
        predicted = normalize_math(boxed)
        if predicted == gold:
            return VerifierResult(1.0, None)
        a, b = _as_number(predicted), _as_number(gold)
        if a is not None and b is not None and abs(a - b) <= self.rel_tol * max(1, abs(b)):
            return VerifierResult(1.0, None)
        reveal = f" The correct answer is {_short(raw_gold, 100)}." if self.reveal_answer else ""
        return VerifierResult(0.0, f"The answer {_short(boxed.strip(), 100)} is incorrect.{reveal}")


# ------------------------------------------------------------------------------------ python tests sandbox
_CODE_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(completion: str) -> str:
    """The last ```python fenced block (an unterminated last block runs to the end), else the whole text."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


@dataclass
class PythonTestsVerifier:
    """Runs the completion's Python code (see `extract_code`) against ``record[tests_field]`` in a sandbox.

    Tests (a list, or a JSON string of one) are either code or stdin/stdout cases:

    - code: strings (typically ``assert f(1) == 2``) or one string of code. They run in order, in one namespace,
      in a *harness* process of their own that never runs model code: the solution runs in another sandboxed
      process and the tests see its top-level functions as proxies, its plain-data globals as they were after
      it ran and the standard-library modules it imported (the harness's own). Arguments and results cross as
      plain data (None, bool, int, float, str, bytes, list, tuple, dict, set; exact types): a result of any other
      type (a subclass of int, an object with its own ``__eq__``, a generator) fails the test, and an exception
      of the solution is raised in the test as the built-in exception of that name (else ``SolutionError``).
      The solution's names that are builtins (its own ``abs``) are not seen by the tests. See the README for
      what such tests cannot express.
    - stdin/stdout (LiveCodeBench's form): ``{"input": str, "output": str}`` (``"testtype": "stdin"`` allowed).
      Each runs the program afresh with the input on stdin; its stdout matches when the whitespace-trimmed lines
      are equal, or equal as numbers (`stdio_mismatch`). An ``exit()`` ends the program; another exception, a
      timeout or a limit fails the test. The expected outputs never enter the sandbox.

    Reward: all passed -> 1.0, else 0.0, or the fraction passed when ``partial_credit``. Feedback names the
    first failing test and why, a failing solution ("Solution raised ..."), or "Timed out after 5 s". Any exit
    (``exit()``, ``SystemExit(0)``, ``os._exit``), exception or stop while a call runs fails that test. Limits:
    wall ``timeout`` seconds for everything (the call returns within about timeout + 2 s), ``call_timeout``
    (default ``timeout``) for one call to the solution or one run of a program, CPU ceil(timeout) + 1 s
    (ceil(call_timeout) + 1 per program run), ``memory_mb`` of address space, ``max_processes``, ``file_mb``
    per written file (the private /tmp holds 4 x ``file_mb``). See `sd_plugin.sandbox` for the isolation;
    ``allow_read_all_files`` lets it run where the only working mode exposes every file of the machine (root
    without a private view: refused by default).
    """

    tests_field: str = "tests"
    timeout: float = 5.0
    partial_credit: bool = False
    memory_mb: int = 1024
    max_processes: int = 64
    file_mb: int = 16
    python: str = sys.executable
    allow_read_all_files: bool = False
    call_timeout: float | None = None

    def __post_init__(self):
        # Probed here (once per interpreter) so that a machine with no safe sandbox fails at load, before training.
        sandbox_setup(self.python, self.allow_read_all_files)

    def _tests(self, record: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, str]] | None]:
        """(the tests as text for feedback, the (input, output) cases when they are stdin/stdout tests)."""
        tests = record[self.tests_field]
        if isinstance(tests, str):
            try:
                decoded = json.loads(tests)
            except ValueError:
                decoded = None
            tests = decoded if isinstance(decoded, list) else [tests]
        tests = list(tests)
        if not tests:
            raise ValueError(f"record[{self.tests_field!r}] holds no tests")
        cases = [test for test in tests if isinstance(test, Mapping)]
        if not cases:
            return [str(test) for test in tests], None
        if len(cases) != len(tests):
            raise ValueError(f"record[{self.tests_field!r}] mixes code tests and stdin/stdout tests")
        for i, case in enumerate(cases):
            where = f"record[{self.tests_field!r}][{i}]"
            if case.get("testtype", "stdin") != "stdin":
                raise ValueError(f"{where} is a {case['testtype']!r} test: only stdin/stdout tests and test code "
                                 "(e.g. 'assert f(1) == 2') are supported")
            if not isinstance(case.get("input"), str) or not isinstance(case.get("output"), str):
                raise ValueError(f"{where} needs an 'input' and an 'output' string, got keys {sorted(case)}")
        return [f"input {_short(repr(case['input']), 100)}" for case in cases], [
            (case["input"], case["output"]) for case in cases]

    def __call__(self, prompt: Any, completion: str, record: Mapping[str, Any]) -> VerifierResult:
        tests, cases = self._tests(record)
        setup = sandbox_setup(self.python, self.allow_read_all_files)
        call_timeout = self.timeout if self.call_timeout is None else self.call_timeout
        limits = {"memory_mb": self.memory_mb, "max_processes": self.max_processes, "file_mb": self.file_mb}
        code = extract_code(completion)
        if cases is not None:
            job = make_job("program", setup, cpu_seconds=call_timeout, code=code, inputs=[text for text, _ in cases],
                           run_timeout=call_timeout, **limits)
            result, problem = run_sandbox(self.python, setup, job, self.timeout)
            if result is None:
                return VerifierResult(0.0, problem)
            failures = _stdio_failures(result, cases)
            if failures is None:
                return VerifierResult(0.0, "Sandbox returned a malformed result")
            result = {"error": None, "failures": failures}
        else:
            solution = make_job("solution", setup, cpu_seconds=self.timeout, code=code, **limits)
            harness = make_job("harness", setup, cpu_seconds=self.timeout, tests=tests, call_timeout=call_timeout,
                               **limits)
            result, problem, ended = run_with_harness(self.python, setup, solution, harness, self.timeout)
            if result is None:
                return VerifierResult(0.0, problem)
            if not _well_formed(result, len(tests)):  # one verdict per test, or none after a failed solution
                return VerifierResult(0.0, "Sandbox returned a malformed result")
            if ended is not None:  # the solution's process ended early: say how
                result["failures"] = [f"{STOPPED}: {ended}" if failure == STOPPED else failure
                                      for failure in result["failures"]]
                if result["error"] == f"Solution {STOPPED[0].lower()}{STOPPED[1:]}":
                    result["error"] += f": {ended}"
        if result["error"] is not None:
            return VerifierResult(0.0, _short(result["error"]))
        failures = result["failures"]
        passed = sum(failure is None for failure in failures)
        reward = passed / len(tests) if self.partial_credit else float(passed == len(tests))
        reward = min(max(reward, 0.0), 1.0)
        for i, failure in enumerate(failures):
            if failure is not None:
                feedback = f"Test {i + 1} of {len(tests)} failed: {tests[i].strip()}\n{failure}"
                return VerifierResult(reward, _short(feedback))
        return VerifierResult(reward, None)


def _well_formed(result: Any, num_tests: int) -> bool:
    if not isinstance(result, dict) or set(result) != {"error", "failures"}:
        return False
    error, failures = result["error"], result["failures"]
    if not isinstance(failures, list) or not all(failure is None or isinstance(failure, str) for failure in failures):
        return False
    if error is not None:
        return isinstance(error, str) and failures == []
    return len(failures) == num_tests


def _stdio_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except (InvalidOperation, ValueError):
        return None


def stdio_mismatch(output: str, expected: str) -> str | None:
    """None when a program's ``output`` matches ``expected`` as LiveCodeBench compares stdin/stdout tests, else why.

    Both are stripped and split into lines, each line stripped; the line counts must be equal and each pair of
    lines equal as text, or as lists of numbers (whitespace-separated tokens read as decimals: "1.0" = "1").
    """
    got, want = _stdio_lines(output), _stdio_lines(expected)
    if len(got) != len(want):
        return f"Wrong answer: {len(got)} output lines, expected {len(want)}: got {_short(repr(output), 120)}"
    for number, (line, wanted) in enumerate(zip(got, want), start=1):
        if line == wanted:
            continue
        numbers = _decimals(line)
        try:
            if numbers is not None and numbers == _decimals(wanted):
                continue
        except InvalidOperation:  # a signalling NaN
            pass
        return f"Wrong answer on line {number}: got {_short(repr(line), 100)}, expected {_short(repr(wanted), 100)}"
    return None


def _stdio_failures(result: Any, cases: list[tuple[str, str]]) -> list[str | None] | None:
    """One verdict per stdin/stdout case from the runs the sandbox reports; None when malformed."""
    runs = result.get("runs") if isinstance(result, dict) and set(result) == {"runs"} else None
    if not isinstance(runs, list) or len(runs) != len(cases):
        return None
    failures = []
    for run, (_, expected) in zip(runs, cases):
        if not (isinstance(run, dict) and set(run) == {"stdout", "ended", "error"}
                and all(isinstance(value, str) for value in run.values())):
            return None
        try:
            output = base64.b64decode(run["stdout"], validate=True).decode("utf-8", "replace")
        except ValueError:
            return None
        ended, error = run["ended"], run["error"]
        if ended.startswith("timed out"):
            failures.append(ended[0].upper() + ended[1:])
        elif ended == "exited with code 1" and error:
            failures.append(f"Runtime error: {error}")
        elif ended != "exited with code 0":
            failures.append(f"The program {ended}" + (f": {error}" if error else ""))
        else:
            failures.append(stdio_mismatch(output, expected))
    return failures


# ---------------------------------------------------------------------------------- loading and safe calls
BUILTIN_VERIFIERS: dict[str, type] = {
    "tool_calls": ToolCallVerifier,
    "tool_call": ToolCallVerifier,  # alias: the name before the docs' "tool_calls" was registered
    "multiple_choice": MultipleChoiceVerifier,
    "boxed_math": BoxedMathVerifier,
    "python_tests": PythonTestsVerifier,
}


def load_verifier(spec: Any, kwargs: Mapping[str, Any] | None = None) -> Verifier:
    """A verifier from a built-in name, ``"package.module:attr"``, ``"package.module.attr"`` or an object.

    Classes are instantiated with ``kwargs``; functions given ``kwargs`` are wrapped in functools.partial.
    Raises ValueError (unknown bare name), ImportError (module or attribute missing) or TypeError (bad
    kwargs, not callable), each naming ``spec``.
    """
    kwargs = dict(kwargs or {})
    obj = spec
    if isinstance(spec, str) and spec in BUILTIN_VERIFIERS:
        obj = BUILTIN_VERIFIERS[spec]
    elif isinstance(spec, str):
        module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
        if not module_name or not attr:
            names = sorted(set(BUILTIN_VERIFIERS) - {"tool_call"})  # tool_call: the old alias of tool_calls
            expected = f"one of {names} or 'package.module:callable'"
            raise ValueError(f"Unknown verifier {spec!r}: expected {expected}")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"Cannot load verifier {spec!r}: importing {module_name!r} failed: {exc}") from exc
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ImportError(f"Cannot load verifier {spec!r}: {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
    if isinstance(obj, type):
        try:
            obj = obj(**kwargs)
        except TypeError as exc:
            raise TypeError(f"Cannot instantiate verifier {spec!r} with kwargs {kwargs}: {exc}") from exc
    elif not callable(obj):
        raise TypeError(f"Verifier {spec!r} is not callable (got {type(obj).__name__})")
    elif kwargs:
        check_keyword_arguments(obj, spec, kwargs)
        obj = functools.partial(obj, **kwargs)
    if not callable(obj):
        raise TypeError(f"Verifier {spec!r} produced a non-callable {type(obj).__name__}")
    return obj


def check_keyword_arguments(function: Any, spec: Any, kwargs: Mapping[str, Any]) -> None:
    """TypeError naming `spec` when `function` (called as function(prompt, completion, record, **kwargs)) takes no
    keyword of that name: a misspelt `verifier_kwargs` key is found when the verifier is loaded, not at its first call."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin or C callable: cannot be checked ahead
    try:
        signature.bind_partial(None, None, None, **kwargs)
    except TypeError as exc:
        accepted = [name for name, parameter in list(signature.parameters.items())[3:]
                    if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]
        raise TypeError(f"verifier {spec!r} does not take these verifier_kwargs {sorted(kwargs)} ({exc}); it takes "
                        f"{', '.join(accepted) or 'no keyword arguments'}") from None


def check_verifier(spec: Any, kwargs: Mapping[str, Any] | None = None, key: str = "verifier") -> None:
    """Resolve and construct the verifier as training will (`load_verifier`): ValueError naming `key` when the name,
    the module or a keyword argument is wrong. Run at config validation, before data preparation and model loading."""
    if spec is None:
        return
    try:
        load_verifier(spec, kwargs)
    except (ValueError, ImportError, TypeError) as error:
        raise ValueError(f"{key}: {error}") from None


class TRLRewardFunctions:
    """Reward functions written for TRL's GRPO / SDPO trainers, as one verifier (`reward_funcs`, TRL's name).

    Each function is called as TRL calls it, on one rollout: ``f(prompts=[messages], completions=[[{"role":
    "assistant", "content": text}]], completion_ids=[None], **{column: [value]})``, every other column of the
    row passed as a one-element list, and returns a list of one reward (None: this function does not apply,
    skipped as TRL's nansum does). The reward is the sum weighted by `reward_weights` (default 1 each).
    Prompts here are always chat messages, so completions come in TRL's conversational form. A reward
    function gives no feedback: SDPO's teacher then sees successful sibling rollouts only.

    funcs: callables or 'package.module:function' paths (or one of either).
    """

    def __init__(self, funcs: Any, weights: list[float] | None = None):
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
        if not funcs:
            raise ValueError("reward_funcs is empty: give at least one reward function")
        self.funcs = [load_verifier(func) for func in funcs]
        self.names = [getattr(func, "__name__", str(spec)) for func, spec in zip(self.funcs, funcs)]
        if weights is not None and len(weights) != len(self.funcs):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(self.funcs)} reward_funcs: give one weight per function")
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(self.funcs)
        self.__name__ = "+".join(self.names)

    def __call__(self, prompt: Any, completion: str, record: Mapping[str, Any]) -> VerifierResult:
        columns = {key: [value] for key, value in record.items() if key not in ("messages", "prompt", "completion", "completion_ids")}
        total = 0.0
        for func, name, weight in zip(self.funcs, self.names, self.weights):
            out = func(prompts=[prompt], completions=[[{"role": "assistant", "content": completion}]],
                       completion_ids=[None], **columns)
            if not isinstance(out, (list, tuple)) or len(out) != 1:
                raise ValueError(f"reward function {name} returned {_short(repr(out), 100)}: expected a list with one reward per completion")
            if out[0] is not None:
                total += weight * float(out[0])
        return VerifierResult(total, None)


def safe_verify(
    verifier: Verifier, prompt: Any, completion: str, record: Mapping[str, Any], *, row: int | None = None
) -> VerifierResult:
    """Call ``verifier`` and never raise: an exception or a non-numeric / non-finite reward gives
    ``VerifierResult(0.0, None)`` and a warning on logger ``sd_plugin.verifiers`` naming ``row``.

    A bare number is accepted as the reward; feedback that is not a str is converted, "" becomes None.
    """
    name = getattr(verifier, "__name__", type(verifier).__name__)
    where = f"row {row}" if row is not None else "a row"
    try:
        out = verifier(prompt, completion, record)
    except Exception as exc:
        error = f"{type(exc).__name__}: {_short(exc)}"
        logger.warning("Verifier %s raised on %s: %s; using reward 0.0", name, where, error)
        return VerifierResult(0.0, None)
    reward, feedback = tuple(out) if isinstance(out, (tuple, list)) and len(out) == 2 else (out, None)
    try:
        value = float(reward) if not isinstance(reward, (str, bytes)) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        shown = _short(repr(reward), 100)
        logger.warning("Verifier %s returned an invalid reward %s on %s; using reward 0.0", name, shown, where)
        return VerifierResult(0.0, None)
    if feedback is not None and not isinstance(feedback, str):
        feedback = str(feedback)
    return VerifierResult(value, feedback or None)


class Verdict(NamedTuple):
    """A completion as the verifier read it and what the verifier said."""

    text: str
    reward: float
    feedback: str | None
    correct: bool  # reward >= success_reward_threshold


def verify_completion(verifier: Verifier, tokenizer, completion_ids: list[int], record: Mapping[str, Any], *,
                      end_of_turn_ids: list[int], success_reward_threshold: float, row: Any = None) -> Verdict:
    """Decode a completion (`sd_plugin.data.completion_text`), verify it (`safe_verify`: never raises) and compare
    the reward with the threshold: the one rule of SDPO, SD-Zero and collect-revisions."""
    text = completion_text(tokenizer, completion_ids, end_of_turn_ids)
    result = safe_verify(verifier, record["messages"], text, record, row=row)
    return Verdict(text, result.reward, result.feedback, result.reward >= success_reward_threshold)
