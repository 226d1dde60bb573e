"""Resume: a training process SIGKILLed mid-run and resumed from its last checkpoint ends where an
uninterrupted run with the same seed ends (LoRA weights, EMA teacher, the rollouts sampled at every step).

The runs are subprocesses of tests/scripts/train_tiny_sdft.py on the tiny Qwen3, rollouts sampled at
temperature 1 (so the restored RNG state matters), 6 rows, batch 2, 5 steps, a checkpoint every 2 steps.
The killed process blocks after step 3 (checkpoint-2 is complete) and is SIGKILLed from here; the resume
starts at step 3, mid-epoch, and crosses the epoch boundary. Control runs resume from copies of the
checkpoint without its RNG state / with the EMA teacher state zeroed and must end elsewhere: they show that
the comparison can fail. A second test ends runs inside a checkpoint save: the incomplete checkpoint is refused,
or under auto-resume passed over for the previous complete one, and the run still ends bit for bit where the
uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "train_tiny_sdft.py"
COMMON = ["--max-steps", "5", "--save-steps", "2", "--rows", "6", "--batch-size", "2"]
KILL_AFTER = 3  # the process blocks once step 3 has ended, so checkpoint-2 is its last complete checkpoint


def script_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def start_blocking_run(output_dir: Path, teacher: str) -> subprocess.Popen:
    args = [sys.executable, str(SCRIPT), str(output_dir), "--teacher", teacher, *COMMON, "--block-at-step", str(KILL_AFTER)]
    log = open(output_dir.parent / f"{output_dir.name}.log", "w")
    return subprocess.Popen(args, cwd=REPO, env=script_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when_blocked(process: subprocess.Popen, output_dir: Path, timeout: float = 400) -> None:
    """SIGKILL the run once it reports that step KILL_AFTER has ended (it then sleeps forever)."""
    marker = output_dir / f"blocked-at-{KILL_AFTER}"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            log = (output_dir.parent / f"{output_dir.name}.log").read_text()[-3000:]
            raise AssertionError(f"the run to kill ended or hung before step {KILL_AFTER} (rc {process.poll()}):\n{log}")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def run_jobs(jobs: list[list[str]], tmp_path: Path) -> subprocess.CompletedProcess:
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, str(SCRIPT), "--jobs", str(jobs_file)], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def checkpoint_copy_without(checkpoint: Path, destination: Path, file_name: str) -> Path:
    shutil.copytree(checkpoint, destination)
    (destination / file_name).unlink()
    return destination


def load_result(output_dir: Path) -> dict:
    return torch.load(output_dir / "result_rank0.pt", weights_only=False)


def max_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys()
    return max((left[name] - right[name]).abs().max().item() for name in left)


def test_killed_run_resumed_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    killed = {teacher: tmp_path / f"killed-{teacher}" for teacher in ("base", "ema")}
    processes = {}
    for teacher, output_dir in killed.items():
        output_dir.mkdir()
        processes[teacher] = start_blocking_run(output_dir, teacher)
    for teacher, output_dir in killed.items():
        kill_when_blocked(processes[teacher], output_dir)
        # Killed for real: checkpoint-2 is there, nothing after it was saved, the run never finished.
        assert (output_dir / "checkpoint-2" / "rng_state.pth").exists()
        assert not (output_dir / "checkpoint-4").exists() and not (output_dir / "result_rank0.pt").exists()
    assert (killed["ema"] / "checkpoint-2" / "sd_teacher_state.pt").exists()

    no_rng = checkpoint_copy_without(killed["base"] / "checkpoint-2", tmp_path / "no-rng" / "checkpoint-2", "rng_state.pth")
    # A checkpoint without its teacher state is refused now (next test): the control zeroes the EMA state instead,
    # which is the teacher restarted from the base weights.
    no_ema = tmp_path / "no-ema" / "checkpoint-2"
    shutil.copytree(killed["ema"] / "checkpoint-2", no_ema)
    state = torch.load(no_ema / "sd_teacher_state.pt", weights_only=True)
    torch.save({name: torch.zeros_like(value) for name, value in state.items()}, no_ema / "sd_teacher_state.pt")
    jobs = []
    for teacher in ("base", "ema"):  # the resumes first, in a fresh process
        jobs.append([str(tmp_path / f"resumed-{teacher}"), "--teacher", teacher, *COMMON,
                     "--resume", str(killed[teacher] / "checkpoint-2")])
    for teacher in ("base", "ema"):
        jobs.append([str(tmp_path / f"uninterrupted-{teacher}"), "--teacher", teacher, *COMMON])
    jobs.append([str(tmp_path / "control-no-rng"), "--teacher", "base", *COMMON, "--resume", str(no_rng)])
    jobs.append([str(tmp_path / "control-no-ema"), "--teacher", "ema", *COMMON, "--resume", str(no_ema)])
    run_jobs(jobs, tmp_path)

    for teacher in ("base", "ema"):
        resumed, reference = load_result(tmp_path / f"resumed-{teacher}"), load_result(tmp_path / f"uninterrupted-{teacher}")
        # The resumed process ran steps 3-5 only, and sampled exactly the completions of the uninterrupted run.
        assert sorted(resumed["completions"]) == [3, 4, 5]
        for step in (3, 4, 5):
            assert resumed["completions"][step] == reference["completions"][step], (teacher, step)
        difference = max_difference(resumed["params"], reference["params"])
        assert difference < 1e-6, f"{teacher}: resumed LoRA weights differ from the uninterrupted run by {difference}"
        if teacher == "ema":
            assert reference["teacher"] and max_difference(resumed["teacher"], reference["teacher"]) < 1e-6
            assert max(t.abs().max().item() for t in reference["teacher"].values()) > 0

    # Controls: the same resume without the RNG state samples other completions and ends elsewhere; without
    # the EMA state the teacher restarts from the base weights and the run ends elsewhere too.
    control, reference = load_result(tmp_path / "control-no-rng"), load_result(tmp_path / "uninterrupted-base")
    assert control["completions"][3] != reference["completions"][3]
    assert max_difference(control["params"], reference["params"]) > 100 * 1e-6
    control, reference = load_result(tmp_path / "control-no-ema"), load_result(tmp_path / "uninterrupted-ema")
    assert max_difference(control["teacher"], reference["teacher"]) > 100 * 1e-6
    assert max_difference(control["params"], reference["params"]) > 100 * 1e-6


def assert_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor], what: str) -> None:
    assert left.keys() == right.keys(), what
    for name in left:
        assert torch.equal(left[name], right[name]), f"{what}: {name} differs"


def test_a_run_killed_inside_a_checkpoint_save_is_refused_or_falls_back_and_ends_bit_identical(tmp_path):
    """The process ends inside the save of checkpoint-4 (checkpoint-2 is complete): once after the trainer's state
    files and before the host's, once after all the host's files but trainer_state.json, the file that marks a
    checkpoint complete. Naming checkpoint-4 is refused (naming what it lacks and checkpoint-2); under
    auto-resume the run goes on from checkpoint-2 and ends bit for bit where the uninterrupted run ends."""
    killed = {where: tmp_path / f"killed-at-{where}" for where in ("plugin", "host")}
    for where, output_dir in killed.items():
        result = subprocess.run([sys.executable, str(SCRIPT), str(output_dir), "--teacher", "ema", *COMMON,
                                 "--exit-during-save", f"4:{where}"], cwd=REPO, env=script_env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 17, result.stdout[-2000:] + result.stderr[-4000:]
        assert (output_dir / "checkpoint-2" / "trainer_state.json").exists()
        assert (output_dir / "checkpoint-4" / "sd_teacher_state.pt").exists()
        assert not (output_dir / "checkpoint-4" / "trainer_state.json").exists()
    assert not (killed["plugin"] / "checkpoint-4" / "adapter_model.safetensors").exists()
    assert (killed["host"] / "checkpoint-4" / "adapter_model.safetensors").exists()
    assert (killed["host"] / "checkpoint-4" / "rng_state.pth").exists()
    # The shape of issue 30's checkpoint: everything of the host's, no teacher state.
    no_teacher = checkpoint_copy_without(killed["host"] / "checkpoint-2", tmp_path / "no-teacher" / "checkpoint-2",
                                         "sd_teacher_state.pt")

    ema = ["--teacher", "ema", *COMMON]
    jobs = [
        [str(tmp_path / "refused-host"), *ema, "--resume", str(killed["host"] / "checkpoint-4"), "--expect-error"],
        [str(tmp_path / "refused-no-teacher"), *ema, "--resume", str(no_teacher), "--expect-error"],
        # Axolotl's auto-resume names the last checkpoint; train(resume_from_checkpoint=True) finds it itself.
        [str(killed["plugin"]), *ema, "--resume", str(killed["plugin"] / "checkpoint-4"), "--auto-resume"],
        [str(killed["host"]), *ema, "--resume", "last"],
        [str(tmp_path / "uninterrupted"), *ema],
    ]
    result = run_jobs(jobs, tmp_path)

    error = (tmp_path / "refused-host" / "error.txt").read_text()
    assert str(killed["host"] / "checkpoint-4") in error and "trainer_state.json" in error
    assert f"previous complete checkpoint {killed['host'] / 'checkpoint-2'}" in error
    error = (tmp_path / "refused-no-teacher" / "error.txt").read_text()
    assert "sd_teacher_state.pt" in error and "no earlier checkpoint" in error
    for output_dir in killed.values():
        assert f"resuming from the previous complete checkpoint {output_dir / 'checkpoint-2'}" in result.stderr

    reference = load_result(tmp_path / "uninterrupted")
    assert max(t.abs().max().item() for t in reference["teacher"].values()) > 0
    for where, output_dir in killed.items():
        resumed = load_result(output_dir)
        assert sorted(resumed["completions"]) == [3, 4, 5], where  # it went on from checkpoint-2
        assert resumed["completions"] == {step: reference["completions"][step] for step in (3, 4, 5)}, where
        assert_identical(resumed["params"], reference["params"], f"{where}: adapter")
        assert_identical(resumed["teacher"], reference["teacher"], f"{where}: teacher")
        # Its own checkpoint-4, saved again, is complete now.
        assert (output_dir / "checkpoint-4" / "trainer_state.json").exists()
