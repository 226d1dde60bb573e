"""Option names are TRL's where TRL has the same setting; the previous release's names still work for one release."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sd_plugin.axolotl.args import SelfDistillationArgs
from sd_plugin.deprecated import RENAMED_KEYS, RENAMED_MODES
from sd_plugin.trainers.sdft import SDFTConfig, SDFTOptions
from sd_plugin.trainers.sdpo import SDPOOptions
from sd_plugin.trainers.sdzero import SDZeroOptions

REPO = Path(__file__).resolve().parents[1]
SDPO = {"verifier": "multiple_choice"}
# old keys -> the same setting under the new keys, and the options class that has them
CASES = [
    (SDFTOptions, {"rollout_temperature": 0.7}, {"temperature": 0.7}),
    (SDFTOptions, {"rollout_top_p": 0.9}, {"top_p": 0.9}),
    (SDFTOptions, {"rollout_top_k": 5}, {"top_k": 5}),
    (SDFTOptions, {"teacher": "ema", "teacher_ema_rate": 0.1}, {"teacher_model_kind": "ema", "teacher_update_rate": 0.1}),
    (SDFTOptions, {"importance_sampling_clip": 1.5}, {"distillation_is_clip": 1.5}),
    (SDPOOptions, {**SDPO, "success_threshold": 0.5}, {**SDPO, "success_reward_threshold": 0.5}),
    (SDPOOptions, {**SDPO, "use_feedback": False}, {**SDPO, "include_environment_feedback": False}),
    (SDPOOptions, {**SDPO, "feedback_only_without_solution": True}, {**SDPO, "environment_feedback_only_without_solution": True}),
    (SDPOOptions, {**SDPO, "sdpo_mode": "hybrid", "distillation_weight": 0.5, "grpo_epsilon": 0.3}, {**SDPO, "sdpo_mode": "hybrid", "distillation_weight": 0.5, "epsilon": 0.3}),
    (SDPOOptions, {**SDPO, "include_own_solution": True}, {**SDPO, "dont_reprompt_on_self_success": False}),
    (SDPOOptions, {**SDPO, "include_own_solution": False}, {**SDPO, "dont_reprompt_on_self_success": True}),
    (SDZeroOptions, {"phase": "distill", **SDPO, "success_threshold": 0.5}, {"phase": "distill", **SDPO, "success_reward_threshold": 0.5}),
    (SDFTOptions, {"distillation_mode": "topk", "distillation_topk": 5}, {"distillation_mode": "topk_logits", "distillation_topk": 5}),
    (SDFTOptions, {"distillation_mode": "sampled", "distillation_alpha": 1.0}, {"distillation_mode": "sampled_token", "distillation_alpha": 1.0}),
    (SDPOOptions, {**SDPO, "distillation_mode": "full"}, {**SDPO, "distillation_mode": "full_logits"}),
]


def test_every_renamed_key_and_value_is_a_current_option():
    current = set().union(*({f.name for f in dataclasses.fields(cls)} for cls in (SDFTOptions, SDPOOptions, SDZeroOptions)))
    assert {new for new, _ in RENAMED_KEYS.values()} <= current
    assert not set(RENAMED_KEYS) & current  # an old name is never also a current one
    assert set(RENAMED_MODES.values()) == {"full_logits", "topk_logits", "sampled_token"}
    covered = set().union(*(set(old) for _, old, _ in CASES))
    assert set(RENAMED_KEYS) <= covered  # every alias is tested below


@pytest.mark.parametrize("cls,old,new", CASES, ids=lambda value: ",".join(value) if isinstance(value, dict) else None)
def test_old_name_warns_and_gives_the_same_options_as_the_new_name(cls, old, new):
    with pytest.warns(FutureWarning) as caught:
        from_old = cls(**old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_new = cls(**new)
    from_old.check()
    assert dataclasses.asdict(from_old) == dataclasses.asdict(from_new)
    messages = " | ".join(str(w.message) for w in caught)
    for key, value in old.items():
        if key in RENAMED_KEYS:
            assert f"{key} is deprecated: use {RENAMED_KEYS[key][0]}" in messages
        if key == "distillation_mode":
            assert f"distillation_mode: {value} is deprecated: use distillation_mode: {RENAMED_MODES[value]}" in messages
    assert "removed in the next release" in messages


def test_training_config_takes_the_old_name_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="rollout_temperature is deprecated: use temperature"):
        args = SDFTConfig(output_dir=str(tmp_path), rollout_temperature=0.7, report_to="none")
    assert args.temperature == 0.7 and not hasattr(args, "rollout_temperature")


@pytest.mark.parametrize("cls", [SDFTOptions, SDFTConfig])
def test_old_and_new_name_together_are_an_error_naming_both(cls, tmp_path):
    extra = {"output_dir": str(tmp_path)} if cls is SDFTConfig else {}
    with pytest.raises(ValueError, match="rollout_temperature and temperature are both set"):
        cls(rollout_temperature=0.7, temperature=0.5, **extra)


def test_a_misspelt_key_is_still_refused():
    with pytest.raises(TypeError, match="rolout_temperature"):
        SDFTOptions(rolout_temperature=0.7)
    with pytest.raises(ValidationError, match="rolout_temperature"):
        SelfDistillationArgs.model_validate({"trainer_type": "sdft", "sdft": {"rolout_temperature": 0.7}})


# ------------------------------------------------------------------ the YAML block
def validated_block(method: str, block: dict) -> dict:
    return SelfDistillationArgs.model_validate({"trainer_type": method, method: block}).model_dump()[method]


@pytest.mark.parametrize("cls,old,new", CASES, ids=lambda value: ",".join(value) if isinstance(value, dict) else None)
def test_yaml_block_takes_old_names_with_a_warning(cls, old, new):
    method = {SDFTOptions: "sdft", SDPOOptions: "sdpo", SDZeroOptions: "sdzero"}[cls]
    with pytest.warns(FutureWarning, match=rf"{method}\.\w+.* is deprecated"):
        from_old = validated_block(method, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_old == validated_block(method, new)
    assert not set(RENAMED_KEYS) & set(from_old)  # the trainer gets the new names only


def test_yaml_block_with_old_and_new_name_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"sdft\.teacher and sdft\.teacher_model_kind are both set"):
        validated_block("sdft", {"teacher": "ema", "teacher_model_kind": "base"})


def test_example_configs_and_the_planner_use_the_current_names():
    from sd_plugin.planner import setup_from_config

    configs = sorted((REPO / "example_configs").glob("*.yml"))
    assert configs
    for path in configs:
        config = yaml.safe_load(path.read_text())
        method = config["trainer_type"]
        block = config.get(method) or {}
        assert not set(RENAMED_KEYS) & set(block), path.name
        assert block.get("distillation_mode") not in RENAMED_MODES, path.name
    config = yaml.safe_load((REPO / "example_configs" / "sdft-qwen3.5-9b-64k-1x80gb.yml").read_text())
    config["sdft"] = {key: value for key, value in config["sdft"].items() if key != "teacher_model_kind"}
    config["sdft"].update(teacher="ema", distillation_mode="topk", distillation_topk=8)
    with pytest.warns(FutureWarning, match="sdft.teacher is deprecated"):
        setup = setup_from_config(config)
    assert setup.teacher == "ema" and setup.distillation_mode == "topk_logits"
