"""`axolotl train` with the plugin is reproducible on CPU: a run whose last checkpoint is cut as a kill inside its
save leaves it, and a run SIGKILLed at random moments (inside checkpoint saves too), resumed with
auto_resume_from_checkpoints, end bit for bit where the uninterrupted run with the same seed ends (adapter and
EMA teacher)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_axolotl_plugin import REPO, quickstart, run_axolotl

from sd_plugin.checkpoints import checkpoint_folders, missing_files, previous_complete


def config(tmp_path: Path, name: str) -> dict:
    cfg = quickstart(tmp_path / name, max_steps=6, save_strategy="steps", save_steps=2, seed=7)
    cfg["sdft"] = dict(cfg["sdft"], teacher_model_kind="ema", teacher_update_rate=0.2)
    return cfg


LAST = "checkpoint-6"  # max_steps 6, save_steps 2
NAMES = ("teacher", "numerics")


def complete(checkpoint: Path) -> bool:
    return checkpoint.is_dir() and not missing_files(checkpoint, NAMES)


def teacher_state(run: Path) -> dict:
    return torch.load(run / "out" / "checkpoint-6" / "sd_teacher_state.pt", weights_only=True)


def assert_identical(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def axolotl_env() -> dict:
    # As run_axolotl: the venv's bin first on PATH (Axolotl launches `accelerate` from there).
    return dict(os.environ, HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def start_axolotl(config_path: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([str(Path(sys.executable).parent / "axolotl"), "train", str(config_path)], cwd=REPO,
                                env=axolotl_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_training(process: subprocess.Popen, out: Path, starts: int, output: Path) -> None:
    """Until Axolotl has logged its `starts`-th "Starting trainer..." into out/debug.log (appended on resume)."""
    log, deadline = out / "debug.log", time.monotonic() + 600
    while (log.read_text(errors="replace").count("Starting trainer") if log.exists() else 0) < starts:
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run ended before training started:\n{output.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_run_cut_inside_a_checkpoint_or_killed_at_random_moments_ends_where_the_uninterrupted_run_ends(tmp_path):
    # The first run also measures how long its training takes until its last checkpoint is complete (from
    # Axolotl's "Starting trainer..."): the window in which the kills below land.
    path = tmp_path / "first.yml"
    path.write_text(yaml.safe_dump(config(tmp_path, "first")))
    process = start_axolotl(path, tmp_path / "first.log")
    wait_for_training(process, tmp_path / "first" / "out", 1, tmp_path / "first.log")
    started = time.monotonic()
    while not complete(tmp_path / "first" / "out" / LAST):
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    window = time.monotonic() - started
    assert process.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    # (The same seed gives the same adapter: every resumed run below must end bit for bit at the first run's.)

    # Deterministically first: the uninterrupted run's outputs with checkpoint-6 cut as a kill inside its save
    # leaves it (no trainer_state.json); auto-resume says so, goes on from checkpoint-4 and ends where the run ends.
    cut = tmp_path / "cut" / "out"
    shutil.copytree(tmp_path / "first" / "out", cut)
    (cut / LAST / "trainer_state.json").unlink()
    (cut / LAST / "adapter_model.safetensors").unlink()
    (cut / LAST / "sd_teacher_state.pt").unlink()
    cfg = config(tmp_path, "cut")
    cfg["auto_resume_from_checkpoints"] = True
    result = run_axolotl(cfg, tmp_path, name="cut.yml")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"checkpoint {cut / LAST} is incomplete: it has no trainer_state.json" in output
    assert f"resuming from the previous complete checkpoint {cut / 'checkpoint-4'} instead" in output
    assert_identical(load_file(cut / LAST / "adapter_model.safetensors"),
                     load_file(tmp_path / "first" / "out" / LAST / "adapter_model.safetensors"))
    assert_identical(teacher_state(tmp_path / "cut"), teacher_state(tmp_path / "first"))

    # SIGKILLed at a random moment of that window, up to twice, each time `axolotl train` again with
    # auto_resume_from_checkpoints, then once more to the end. A kill inside a checkpoint save leaves an incomplete
    # checkpoint, which the next run must pass over for the previous complete one. (A kill after the last
    # checkpoint ends the series: resuming a finished run makes transformers train one step more.)
    cfg = config(tmp_path, "killed")
    cfg["auto_resume_from_checkpoints"] = True
    path = tmp_path / "killed.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "killed" / "out"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kills = []
    for attempt in range(1, 3):
        if complete(out / LAST):
            break
        process = start_axolotl(path, tmp_path / f"killed-{attempt}.log")
        try:
            wait_for_training(process, out, attempt, tmp_path / f"killed-{attempt}.log")
            time.sleep(rng.uniform(0.0, window))
            try:
                os.killpg(process.pid, signal.SIGKILL)
                kills.append(process.wait() == -signal.SIGKILL)
            except ProcessLookupError:  # it had already ended (the window was measured on another run)
                kills.append(False)
        finally:
            process.wait()
    story = f"seed {seed}, window {window:.1f} s, kills that hit a running process: {kills}"
    print(story, "; checkpoints after the kills:", {c.name: missing_files(c, NAMES) for c in sorted(out.glob("checkpoint-*"))})
    assert any(kills), story
    if not complete(out / LAST):
        last = checkpoint_folders(str(out))[-1] if checkpoint_folders(str(out)) else None
        fallback = last is not None and missing_files(last, NAMES) and previous_complete(last, NAMES)
        result = run_axolotl(cfg, tmp_path, name="killed.yml")
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        if fallback:  # the warning reaches the user's terminal
            assert f"checkpoint {last} is incomplete" in result.stdout + result.stderr, story
    assert_identical(load_file(out / LAST / "adapter_model.safetensors"), load_file(tmp_path / "first" / "out" / LAST / "adapter_model.safetensors"))
    assert_identical(teacher_state(tmp_path / "killed"), teacher_state(tmp_path / "first"))
