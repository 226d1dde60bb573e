"""benchmarks/gpu_check.py without a GPU: the dry run runs every check's code on the CPU at tiny sizes and reports
each GPU check as skipped with its exact reason; the checks' own GPU runs are the script's job on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402

CUDA_REASON = "no CUDA device (torch "


def test_without_a_gpu_every_check_is_skipped_naming_what_is_missing():
    for check in gpu_check.CHECKS:
        result = gpu_check.worker(check.name, dry_run=False)
        assert result.status == "skipped" and result.note.startswith(CUDA_REASON), (check.name, result)
        for module in check.modules:  # a missing package is named too
            if gpu_check.missing_module(module):
                assert f"{module} does not import" in result.note


def test_unknown_check_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--only", "tiled_64k_step,no_such_check"])
    assert "unknown check(s) no_such_check" in capsys.readouterr().err


def test_a_worker_that_dies_is_a_failed_row_not_a_crashed_table(monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULT_PREFIX", "NEVER PRINTED ")
    row = gpu_check.run_worker("tiled_sdpa_backend", dry_run=False, timeout=300)
    assert row.status == "fail" and "exited 0 without a result" in row.note


@pytest.mark.slow
def test_dry_run_runs_every_check_on_the_cpu_and_prints_each_skip_reason(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert [row["check"] for row in rows] == [check.name for check in gpu_check.CHECKS]
    for row in rows:
        assert row["status"] == "skipped", row
        assert row["note"].startswith("--dry-run: code ran on CPU at tiny sizes; GPU check not run: " + CUDA_REASON), row
    assert "| check | result | measured | planned / expected | note | s |" in run.stdout
    # The CPU versions measured something real: the tiled and untiled forwards agree, so does the delta rule.
    numbers = {row["check"]: row["numbers"] for row in rows}
    assert numbers["tiled_equals_untiled"]["hidden"] < 1e-4
    assert numbers["fla_initial_state_grad"]["initial_state_grad"] < 1e-4
