"""Loud failures during training (sd_plugin/watch.py): steps without a learning signal, and the collapse watch."""

import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from sd_plugin import SDPOConfig, SDPOTrainer
from sd_plugin import rows as rows_module
from sd_plugin.rollout import Rollouts
from sd_plugin.testing import build_model
from sd_plugin.watch import CollapseWatch, SignalWatch

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def sdpo_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, rewards, truncated=False, **overrides):
    """SDPO on 2 prompts x 3 scripted rollouts whose rewards are `rewards` (no feedback, nothing at threshold 1)."""
    texts = [f"answer {i}" for i in range(6)]

    def sample(self, model, prompt_ids, prompt_mask):
        completions = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        ids, mask = rows_module.right_pad(completions, tokenizer.pad_token_id)
        groups = torch.arange(prompt_ids.shape[0]).repeat_interleave(self.options.num_generations)
        return Rollouts(ids, mask, groups, torch.full((6,), truncated, dtype=torch.bool))

    monkeypatch.setattr(SDPOTrainer, "sample", sample)
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=4, logging_steps=1,
                    max_completion_length=12, report_to="none", save_strategy="no", learning_rate=5e-3, use_cpu=True,
                    seed=0, verifier="multiple_choice", num_generations=3)
    settings.update(overrides)
    rows = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in quickstart_rows[:2]])
    trainer = SDPOTrainer(model=build_model("qwen3", tokenizer), args=SDPOConfig(**settings), train_dataset=rows,
                          processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.verifier = lambda prompt, completion, record: (rewards[int(completion.split()[-1])], None)
    return trainer


def no_signal_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "has no learning signal" in r.getMessage()]


def test_sdpo_without_any_teacher_prompt_warns_each_step_and_stops(tmp_path, tokenizer, quickstart_rows, monkeypatch, caplog):
    trainer = sdpo_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, [0.0] * 6, max_steps_without_signal=3)
    with caplog.at_level(logging.WARNING, logger="sd_plugin"), \
            pytest.raises(RuntimeError, match=r"3 optimizer steps in a row \(the last: step 3\) had no learning signal.*"
                                              r"max_steps_without_signal=3.*no rollout got a teacher prompt"):
        trainer.train()
    warnings = no_signal_warnings(caplog)
    assert len(warnings) == 2 and warnings[0].startswith("step 1 has no learning signal (1 in a row, the run stops at 3)")
    assert "raise num_generations, lower success_reward_threshold" in warnings[0]


def test_max_steps_without_signal_zero_warns_but_trains_on(tmp_path, tokenizer, quickstart_rows, monkeypatch, caplog):
    trainer = sdpo_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, [0.0] * 6, max_steps_without_signal=0)
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        trainer.train()
    assert trainer.state.global_step == 4 and len(no_signal_warnings(caplog)) == 4
    assert trainer.signal_watch.state_dict()["steps_without_signal"] == 4


def test_hybrid_rows_with_a_grpo_advantage_are_a_signal(tmp_path, tokenizer, quickstart_rows, monkeypatch, caplog):
    """No teacher prompt, but rewards differ inside each group: the GRPO term of sdpo_mode hybrid learns."""
    rewards = [0.5, 0.0, 0.0, 0.0, 0.25, 0.0]
    trainer = sdpo_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, rewards, max_steps_without_signal=1,
                           max_steps=2, sdpo_mode="hybrid", distillation_weight=0.5)
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        trainer.train()
    assert not no_signal_warnings(caplog)


def test_every_rollout_truncated_warns_with_the_cap(tmp_path, tokenizer, quickstart_rows, monkeypatch, caplog):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # a solution in each group: every sibling has a teacher prompt
    trainer = sdpo_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, rewards, truncated=True, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if "hit max_completion_length" in r.getMessage()]
    assert messages and messages[0].startswith("step 1: every rollout (6) hit max_completion_length=12")
    assert "raise max_completion_length" in messages[0] and not no_signal_warnings(caplog)


def test_zero_loss_and_gradient_is_no_signal(caplog):
    watch = SignalWatch(2)
    common = dict(signal_rows=4, rows=4, sampled=4, truncated=0, no_signal_advice="-", max_completion_length=8)
    watch.end_step(1, loss=0.0, grad_norm=0.0, **common)
    watch.end_step(2, loss=0.3, grad_norm=0.1, **common)  # a step with a signal resets the count
    watch.end_step(3, loss=0.0, grad_norm=0.0, **common)
    state = watch.state_dict()
    resumed = SignalWatch(2)
    resumed.load_state_dict(state)
    with pytest.raises(RuntimeError, match="the loss and its gradient are exactly 0"):
        resumed.end_step(4, loss=0.0, grad_norm=0.0, **common)
    watch.end_step(4, loss=0.0, grad_norm=None, **common)  # no gradient to read (skipped step): not judged


def test_max_steps_without_signal_is_validated(tmp_path):
    with pytest.raises(ValueError, match="max_steps_without_signal must be >= 0"):
        SDPOConfig(output_dir=str(tmp_path), verifier="multiple_choice", max_steps_without_signal=-1, use_cpu=True)


# ------------------------------------------------------------------ collapse watch
def feed(watch, series):
    found = []
    for step, logs in enumerate(series):
        found += watch.observe(step, logs)
    return found


def test_collapse_watch_flags_a_falling_training_reward():
    found = feed(CollapseWatch(), [{"self_distillation/reward_mean": r} for r in (0.5, 0.6, 0.55, 0.5, 0.3, 0.3, 0.3)])
    assert len(found) == 1 and "fell to 0.367" in found[0] and "from 0.550 in the first steps" in found[0]
    assert feed(CollapseWatch(), [{"self_distillation/success_fraction": r} for r in (0.5, 0.6, 0.55, 0.5, 0.5, 0.6, 0.7)]) == []


def test_collapse_watch_fires_on_the_measured_sdpo_collapse_and_not_on_the_hybrid():
    """The training rewards benchmarks/README.md reports on the demo model ("SDPO on a real model"): distillation
    only at the paper's settings (0.31 -> 0.00) must warn by step 6; the hybrid's rise must not."""
    paper = (0.312, 0.438, 0.438, 0.188, 0.0, 0.0, 0.062, 0.125)
    low_temperature = (0.688, 0.688, 0.688, 0.625, 0.688, 0.438, 0.125, 0.0)  # T 0.7, lr 3e-4: falls at steps 6-8
    for series, by_step in ((paper, 6), (low_temperature, 7)):
        watch = CollapseWatch()
        steps = [step for step, reward in enumerate(series, start=1)
                 if watch.observe(step, {"self_distillation/reward_mean": reward})]
        assert steps and steps[0] <= by_step, (series, steps)
    hybrid = (0.312, 0.438, 0.625, 0.625, 0.812, 0.688, 0.938, 0.812)
    assert feed(CollapseWatch(), [{"self_distillation/reward_mean": r} for r in hybrid]) == []


@pytest.mark.parametrize("key", ["completions/mean_length", "sampled_token_entropy"])
def test_collapse_watch_flags_drift_from_step_zero(key):
    found = feed(CollapseWatch(), [{key: v} for v in (20.0, 22.0, 30.0, 45.0, 50.0, 52.0)])
    assert len(found) == 1 and "2.08x its first value 20.000" in found[0]
    assert feed(CollapseWatch(), [{key: v} for v in (20.0, 15.0, 12.0, 11.0, 25.0)]) == []
    assert "0.40x" in feed(CollapseWatch(), [{key: v} for v in (20.0, 10.0, 8.0, 6.0)])[0]


def test_collapse_watch_flags_a_falling_held_out_evaluation_and_can_stop():
    from transformers import TrainerControl, TrainerState

    watch = CollapseWatch(stop_on_collapse=True)
    state, control = TrainerState(), TrainerControl()
    for step, value in ((0, 0.75), (10, 0.72), (20, 0.5)):
        state.global_step = step
        watch.on_log(None, state, control, logs={"eval_prior_pass_rate": value, "eval_prior_completion_length": 9.0})
        assert control.should_training_stop == (step == 20)
    assert watch.findings[0]["metric"] == "eval_prior_pass_rate"
    assert "fell to 0.500 at step 20 from 0.750 at step 0" in watch.findings[0]["message"]
    resumed = CollapseWatch()
    resumed.load_state_dict(watch.state_dict())
    assert resumed.state_dict() == watch.state_dict()
    assert resumed.observe(30, {"eval_prior_pass_rate": 0.4}) == []  # the same finding is not repeated
    assert resumed.observe(40, {"eval_prior_pass_rate": 0.8}) == [] and not resumed.alarms  # recovered


def test_trainer_feeds_the_collapse_watch_and_logs_the_entropy_estimate(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    trainer = sdpo_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, rewards, max_steps=2, stop_on_collapse=True)
    trainer.train()
    history = trainer.collapse_watch.state_dict()["history"]
    assert [step for step, _ in history["self_distillation/reward_mean"]] == [1, 2]
    entropy = history["sampled_token_entropy"]
    assert len(entropy) == 2 and all(value > 0 for _, value in entropy)


def test_the_watches_go_through_a_checkpoint(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    """A resumed run keeps judging against the first steps' values and the no-signal count of the killed run."""
    from sd_plugin.checkpoints import load_state

    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    trainer = sdpo_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, rewards, max_steps=2, save_steps=2,
                           save_strategy="steps")
    trainer.train()
    states = trainer.checkpoint_state()
    assert {"signal_watch", "collapse_watch"} <= set(states)
    resumed = sdpo_trainer(tmp_path / "again", tokenizer, quickstart_rows, monkeypatch, rewards, max_steps=2)
    load_state(tmp_path / "out" / "checkpoint-2", resumed.checkpoint_state())
    assert resumed.collapse_watch.state_dict() == trainer.collapse_watch.state_dict()
    assert resumed.collapse_watch.state_dict()["history"]["self_distillation/reward_mean"]
    assert resumed.signal_watch.state_dict() == trainer.signal_watch.state_dict()
