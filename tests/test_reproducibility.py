"""`axolotl train` with the plugin is reproducible: the same config and seed give the same adapter bit for bit on
CPU, and a run SIGKILLed after a checkpoint and resumed ends where the uninterrupted run ends."""

import os
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


def config(tmp_path: Path, name: str) -> dict:
    cfg = quickstart(tmp_path / name, max_steps=4, save_strategy="steps", save_steps=2, seed=7)
    cfg["sdft"] = dict(cfg["sdft"], teacher_model_kind="ema", teacher_update_rate=0.2)
    return cfg


def adapter(run: Path) -> dict:
    return load_file(run / "out" / "adapter_model.safetensors")


def teacher_state(run: Path) -> dict:
    return torch.load(run / "out" / "checkpoint-4" / "sd_teacher_state.pt", weights_only=True)


def assert_identical(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.slow
def test_same_seed_same_adapter_and_a_killed_run_resumes_to_the_same_end(tmp_path):
    for name in ("first", "second"):
        result = run_axolotl(config(tmp_path, name), tmp_path, name=f"{name}.yml")
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert_identical(adapter(tmp_path / "first"), adapter(tmp_path / "second"))
    assert_identical(teacher_state(tmp_path / "first"), teacher_state(tmp_path / "second"))

    # Killed right after its step-2 checkpoint, then `axolotl train` again with auto_resume_from_checkpoints.
    cfg = config(tmp_path, "killed")
    cfg["auto_resume_from_checkpoints"] = True
    path = tmp_path / "killed.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "killed" / "out"
    process = subprocess.Popen([str(Path(sys.executable).parent / "axolotl"), "train", str(path)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint-2" / "sd_teacher_state.pt").exists():
            assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not (out / "checkpoint-4").exists(), "the kill came too late to test a resume"
    result = run_axolotl(cfg, tmp_path, name="killed.yml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert_identical(adapter(tmp_path / "killed"), adapter(tmp_path / "first"))
    assert_identical(teacher_state(tmp_path / "killed"), teacher_state(tmp_path / "first"))
