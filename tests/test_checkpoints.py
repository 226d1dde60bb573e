"""Which checkpoint a resume uses (sd_plugin/checkpoints.py), on folders made here: no model, no training.

The end-to-end kills inside a checkpoint save are in tests/test_resume.py (and through `axolotl train` in
tests/test_reproducibility.py)."""

import json
import logging

import pytest
import torch

from sd_plugin.checkpoints import StateHooks, load_state, missing_files, resolve_resume, save_state

NAMES = ("teacher", "numerics")


def checkpoint(root, step, *, host=True, names=NAMES, cut=False):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in names:
        torch.save({}, folder / f"sd_{name}_state.pt")
    if host:
        (folder / "trainer_state.json").write_text('{"global_step": ' if cut else json.dumps({"global_step": step}))
    return folder


def test_a_complete_checkpoint_is_used_as_named(tmp_path):
    folder = checkpoint(tmp_path, 4)
    assert resolve_resume(str(folder), str(tmp_path), NAMES) == str(folder)
    assert resolve_resume(True, str(tmp_path), NAMES) == str(folder)
    assert resolve_resume(None, str(tmp_path), NAMES) is None


@pytest.mark.parametrize("kind", ["no host marker", "cut host marker", "no teacher state"])
def test_an_incomplete_checkpoint_is_refused_naming_the_file_and_the_previous_complete_one(tmp_path, kind):
    previous = checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 3, host=False)  # incomplete too: not the previous *complete* one
    last = checkpoint(tmp_path, 4, host=kind != "no host marker", cut=kind == "cut host marker",
                      names=("numerics",) if kind == "no teacher state" else NAMES)
    checkpoint(tmp_path, 6)  # a later one is never "previous"
    missing = {"no host marker": "no trainer_state.json", "cut host marker": "no a readable trainer_state.json",
               "no teacher state": "no sd_teacher_state.pt"}[kind]
    with pytest.raises(ValueError) as error:
        resolve_resume(str(last), str(tmp_path), NAMES)
    assert f"checkpoint {last} is incomplete: it has {missing}" in str(error.value)
    assert f"resume from the previous complete checkpoint {previous} instead" in str(error.value)


def test_auto_resume_falls_back_to_the_previous_complete_checkpoint_with_a_warning(tmp_path, caplog):
    previous = checkpoint(tmp_path, 8)
    last = checkpoint(tmp_path, 16, host=False)
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        assert resolve_resume(str(last), str(tmp_path), NAMES, auto=True) == str(previous)
        assert resolve_resume(True, str(tmp_path), NAMES) == str(previous)
    assert f"resuming from the previous complete checkpoint {previous} instead" in caplog.text
    assert f"checkpoint {last} is incomplete" in caplog.text


def test_without_any_complete_checkpoint_explicit_is_an_error_and_auto_starts_over(tmp_path, caplog):
    only = checkpoint(tmp_path, 2, host=False)
    with pytest.raises(ValueError, match="no earlier checkpoint beside it is complete"):
        resolve_resume(str(only), str(tmp_path), NAMES)
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        assert resolve_resume(str(only), str(tmp_path), NAMES, auto=True) is None
    assert "training starts from step 0" in caplog.text
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        resolve_resume(True, str(tmp_path / "empty"), NAMES)
    with pytest.raises(ValueError, match="no such folder"):
        resolve_resume(str(tmp_path / "checkpoint-9"), str(tmp_path), NAMES)


def test_save_state_writes_every_entry_and_unmarks_a_folder_saved_again(tmp_path):
    folder = checkpoint(tmp_path, 4)  # complete, from an earlier pass over this step
    values = {"teacher": {"delta.x": torch.ones(2)}, "numerics": {"in_a_row": 1, "skipped": 2}}
    states = {name: StateHooks(lambda value=value: value, lambda state: None) for name, value in values.items()}
    save_state(folder, states)
    assert missing_files(folder, NAMES) == ["trainer_state.json"]  # complete again only once the host has written
    loaded = {}
    load_state(folder, {name: StateHooks(dict, lambda state, name=name: loaded.__setitem__(name, state)) for name in NAMES})
    assert torch.equal(loaded["teacher"]["delta.x"], torch.ones(2)) and loaded["numerics"] == values["numerics"]

    def fails():
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError):  # an interrupted write leaves the previous file, never a partial one
        save_state(folder, {"teacher": StateHooks(fails, None)})
    assert sorted(p.name for p in folder.iterdir()) == ["sd_numerics_state.pt", "sd_teacher_state.pt"]


def test_a_state_file_of_another_teacher_is_refused_naming_the_file(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    from sd_plugin.teacher import Teacher
    from sd_plugin.testing import build_model

    tiny_lora_model = get_peft_model(build_model("qwen3", tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    ema = Teacher(tiny_lora_model, "ema", 0.1)
    folder = tmp_path / "checkpoint-2"
    save_state(folder, {"teacher": ema})
    with pytest.raises(ValueError, match=r"sd_teacher_state.pt: cannot resume from it \(the teacher state holds"):
        load_state(folder, {"teacher": Teacher(tiny_lora_model, "base")})
    with pytest.raises(ValueError, match="sd_teacher_state.pt: cannot resume from it .*no low-rank factors"):
        load_state(folder, {"teacher": Teacher(tiny_lora_model, "ema", 0.1, ema_rank=2)})
    load_state(folder, {"teacher": Teacher(tiny_lora_model, "ema", 0.1)})


def test_the_non_finite_step_counters_go_through_a_checkpoint(tmp_path):
    from sd_plugin.trainers.numerics import NonFiniteStepGuard

    before, after = NonFiniteStepGuard(), NonFiniteStepGuard()
    before._nonfinite_steps_in_a_row, before._nonfinite_steps_skipped = 2, 5
    save_state(tmp_path, {"numerics": before.numerics_state()})
    load_state(tmp_path, {"numerics": after.numerics_state()})
    assert (after._nonfinite_steps_in_a_row, after.nonfinite_steps_skipped) == (2, 5)
