"""Latency of the `python_tests` verifier: one verification (sandbox start to reward) and one call to the solution.

    python benchmarks/bench_verifier.py --reps 11 --calls 2000   # the table in benchmarks/README.md
    python benchmarks/bench_verifier.py                          # quicker: 15 reps, 100 calls
    # before (another commit's verifier, same script):
    mkdir /tmp/old && git archive COMMIT sd_plugin | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/bench_verifier.py

Cases (each the median of --reps verifications of a correct `add`, after one untimed warm-up):

assert x3      3 assert tests, each calling `add` once (the common record);
assert xN      one test string whose loop calls `add` --calls times; the per-call cost is
               (assert xN - assert x1 loop) / (N - 1), printed as "per call";
stdio x3       3 stdin/stdout tests (LiveCodeBench form) of a program that reads two numbers (skipped when the
               verifier has no stdin/stdout tests).

It prints the sandbox mode in use (private file-system view or the fallback): both modes start the same processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sd_plugin.verifiers import PythonTestsVerifier, sandbox_mode

ADD = "```python\ndef add(a, b):\n    return a + b\n```"
PROGRAM = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def timed(verify, completion: str, record: dict, reps: int) -> float:
    """Median seconds of one verification; checks that each gets reward 1."""
    verify("q", completion, record)  # warm-up: the first call may probe the sandbox
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        reward, feedback = verify("q", completion, record)
        times.append(time.perf_counter() - start)
        assert reward == 1.0, feedback
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    verify = PythonTestsVerifier(timeout=30)
    mode = sandbox_mode()
    print(f"sandbox: private_files={mode['private_files']} uid={mode['uid']} network={mode['network']!r}")
    loop = "for i in range({n}):\n    assert add(i, 1) == i + 1"
    cases = [
        ("assert x3", ADD, {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]}),
        ("assert x1 loop", ADD, {"tests": [loop.format(n=1)]}),
        (f"assert x{args.calls} loop", ADD, {"tests": [loop.format(n=args.calls)]}),
        ("stdio x3", PROGRAM, {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "-1 1", "output": "0"},
                                         {"input": "0 0\n", "output": "0"}]}),
    ]
    results = {}
    print("| case | median per verification |")
    print("|---|---|")
    for name, completion, record in cases:
        try:
            results[name] = timed(verify, completion, record, args.reps)
        except (AssertionError, TypeError, ValueError) as exc:  # stdio tests on a verifier without them
            print(f"| {name} | not supported ({str(exc).splitlines()[0][:60]}) |")
            continue
        print(f"| {name} | {results[name] * 1000:.1f} ms |")
    per_call = (results[f"assert x{args.calls} loop"] - results["assert x1 loop"]) / (args.calls - 1)
    print(f"| per call to the solution | {per_call * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
