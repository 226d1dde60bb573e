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


# ------------------------------------------------------------------ TRL's meanings and spellings
def test_teacher_sync_steps_has_trls_meaning_and_the_old_meaning_is_refused_with_its_new_spelling():
    # TRL: how often the EMA update runs (default 1): a ported `ema` + 1 is an EMA teacher, not the live student.
    options = SDPOOptions(**SDPO, teacher_model_kind="ema", teacher_sync_steps=1)
    options.check()
    assert SDFTOptions().teacher_sync_steps == 1
    for method, block in (("sdft", {"teacher_model_kind": "base", "teacher_sync_steps": 5}),
                          ("sdpo", {**SDPO, "teacher_model_kind": "live", "teacher_sync_steps": 5})):
        with pytest.raises(ValueError, match="teacher_model_kind: ema, teacher_update_rate: 1.0, teacher_sync_steps: N"):
            validated_block(method, block)
    validated_block("sdft", {"teacher_model_kind": "ema", "teacher_update_rate": 1.0, "teacher_sync_steps": 5})
    # the old default, 0 ("never hard-copy"), warns and is dropped: TRL's default 1 is the same teacher
    with pytest.warns(FutureWarning, match="teacher_sync_steps: 0 is the previous release's default"):
        assert validated_block("sdft", {"teacher_sync_steps": 0})["teacher_sync_steps"] == 1
    with pytest.raises(ValueError, match="teacher_sync_steps must be >= 1"):
        SDFTOptions(teacher_model_kind="ema", teacher_sync_steps=-1).check()


@pytest.mark.parametrize("method,trl,ours", [
    ("sdpo", {**SDPO, "max_reprompt_len": 4096}, {**SDPO, "max_teacher_prompt_length": 4096}),
    ("sdft", {"teacher_prompt_template": "{prompt}\n\nReference:\n{privileged_context}"},
     {"teacher_template": "{question}\n\nReference:\n{demonstration}"}),
])
def test_trl_spellings_are_accepted_silently_in_python_and_yaml(method, trl, ours):
    cls = {"sdft": SDFTOptions, "sdpo": SDPOOptions}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.asdict(cls(**trl)) == dataclasses.asdict(cls(**ours))
        assert validated_block(method, trl) == validated_block(method, ours)


def test_trl_spellings_give_errors_that_name_the_key():
    with pytest.raises(ValueError, match="must contain both {prompt} and {privileged_context}"):
        SDFTOptions(teacher_prompt_template="{prompt} only")
    with pytest.raises(ValueError, match="teacher_prompt_template is TRL's name of teacher_template, which this trainer does not have"):
        validated_block("sdpo", {**SDPO, "teacher_prompt_template": "{prompt}{privileged_context}"})
    with pytest.raises(ValueError, match="max_reprompt_len and sdpo.max_teacher_prompt_length are both set"):
        validated_block("sdpo", {**SDPO, "max_reprompt_len": 10, "max_teacher_prompt_length": 10})


def exact_match_reward(completions, answer, **kwargs):
    """A reward function as written for TRL's GRPOTrainer (conversational completions, a dataset column)."""
    return [1.0 if answer_value in completion[0]["content"] else 0.0 for completion, answer_value in zip(completions, answer)]


def skipping_reward(completions, **kwargs):
    return [None for _ in completions]


def test_trl_reward_functions_become_one_verifier():
    from sd_plugin.verifiers import TRLRewardFunctions, safe_verify

    verifier = TRLRewardFunctions([exact_match_reward, "test_names:skipping_reward", exact_match_reward], [0.5, 3.0, 0.25])
    record = {"messages": [{"role": "user", "content": "Capital of France?"}], "tools": None, "answer": "Paris"}
    assert verifier(record["messages"], "It is Paris.", record) == (0.75, None)  # None rewards are skipped, as TRL's nansum
    assert verifier(record["messages"], "Lyon", record) == (0.0, None)
    with pytest.raises(ValueError, match="2 values for 1 reward_funcs"):
        TRLRewardFunctions(exact_match_reward, [1.0, 2.0])
    broken = TRLRewardFunctions(lambda completions, **kwargs: 1.0)  # not a list: a warning and reward 0, never a crash
    assert safe_verify(broken, record["messages"], "x", record) == (0.0, None)


def test_sdpo_trainer_takes_trls_reward_funcs_argument(tmp_path, tokenizer, quickstart_rows):
    from datasets import Dataset

    from sd_plugin import SDPOConfig, SDPOTrainer
    from sd_plugin.testing import build_model
    from sd_plugin.verifiers import TRLRewardFunctions

    def always_one(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    # TRL's way: the config names no verifier, the trainer gets reward_funcs.
    args = SDPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_steps=1,
                      logging_steps=1, max_completion_length=6, report_to="none", save_strategy="no", use_cpu=True)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in quickstart_rows[:2]])
    trainer = SDPOTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                          reward_funcs=always_one)
    assert isinstance(trainer.verifier, TRLRewardFunctions)
    trainer.train()
    assert trainer.state.log_history[0]["self_distillation/reward_mean"] == 1.0
    with pytest.raises(ValueError, match="keep one"):
        SDPOTrainer(model=build_model("qwen3", tokenizer), train_dataset=data, processing_class=tokenizer,
                    args=SDPOConfig(output_dir=str(tmp_path / "o2"), verifier="multiple_choice", report_to="none", use_cpu=True),
                    reward_funcs=always_one)


def test_yaml_reward_funcs_are_import_paths():
    block = validated_block("sdpo", {"reward_funcs": ["test_names:exact_match_reward"], "reward_weights": [2.0]})
    assert block["reward_funcs"] == ["test_names:exact_match_reward"] and block["verifier"] is None
    with pytest.raises(ValueError, match="verifier and reward_funcs are both set"):
        validated_block("sdpo", {**SDPO, "reward_funcs": ["test_names:exact_match_reward"]})


# ------------------------------------------------------------------ the batch counts completions (TRL's GRPO / SDPO)
def test_sdpo_batch_counts_completions_like_trl(tmp_path, tokenizer, quickstart_rows):
    from datasets import Dataset

    from sd_plugin import SDPOConfig, SDPOTrainer
    from sd_plugin.testing import build_model

    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in quickstart_rows[:6]])

    def trainer(batch):
        args = SDPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch, num_generations=3,
                          max_steps=1, max_completion_length=6, report_to="none", save_strategy="no", use_cpu=True,
                          verifier="multiple_choice")
        return SDPOTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=data, processing_class=tokenizer)

    built = trainer(6)
    loader = built.get_train_dataloader()
    assert len(next(iter(loader))["input_ids"]) == 2  # 6 completions = 2 prompts x 3 rollouts
    assert built.args.per_device_train_batch_size == 6  # the user's value is left as given
    with pytest.raises(ValueError, match=r"per_device_train_batch_size \(4\) counts completions.*per_device_train_batch_size: 12"):
        trainer(4)


def test_yaml_micro_batch_size_counts_completions():
    base = {"trainer_type": "sdpo", "sdpo": {**SDPO, "num_generations": 4}}
    SelfDistillationArgs.model_validate({**base, "micro_batch_size": 8})
    with pytest.raises(ValueError, match=r"micro_batch_size \(2\) counts completions.*micro_batch_size: 8"):
        SelfDistillationArgs.model_validate({**base, "micro_batch_size": 2})


def test_coming_from_trl_table_names_real_options():
    """Every TRL option in the README's "Coming from TRL" table is one of TRL's, and every option of ours is ours."""
    import re

    from trl.experimental.sdft import SDFTConfig as TRLSDFTConfig
    from trl.experimental.sdpo import SDPOConfig as TRLSDPOConfig

    from sd_plugin.deprecated import TRL_SPELLINGS

    text = (REPO / "README.md").read_text()
    table = text.split("## Coming from TRL", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) > 15
    from trl import GRPOConfig

    trl = {f.name for cls in (TRLSDFTConfig, TRLSDPOConfig, GRPOConfig) for f in dataclasses.fields(cls)}
    ours = {f.name for cls in (SDFTConfig, SDPOOptions, SDZeroOptions) for f in dataclasses.fields(cls)}
    values = {"initial", "paper", "full_logits", "topk_logits", "micro_batch_size", "demonstration"}  # not option names
    for cells in rows:
        for name in re.findall(r"`([a-z_*]+)`", cells[0]):
            if name.endswith("*") or name == "privileged_context":
                continue
            assert name in trl or name == "reward_funcs", name  # reward_funcs: TRL's trainer argument
        for name in re.findall(r"`([a-z_]+)`", cells[1]):
            assert name in ours or name in TRL_SPELLINGS or name in values, name
