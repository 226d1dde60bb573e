"""Numerics guards: a step with a non-finite loss, logits or gradient is skipped and counted (the weights
and the optimizer state stay as they were), a run of them stops training with a clear error, and
`debug_numerics` checks that every per-token divergence is >= 0."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from sd_plugin import SDFTConfig, SDFTTrainer
from sd_plugin.losses import DistillationOutput
from sd_plugin.testing import build_model
from sd_plugin.trainers import base as base_module
from sd_plugin.trainers.sdft import SDFTOptions

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def make_trainer(tmp_path, tokenizer, quickstart_rows, rows=4, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, logging_steps=1,
                    max_completion_length=6, report_to="none", save_strategy="no", learning_rate=5e-3, use_cpu=True,
                    seed=0, num_loss_tokens_to_skip=0)
    settings.update(overrides)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:rows]])
    return SDFTTrainer(model=build_model("qwen3", tokenizer), args=SDFTConfig(**settings), train_dataset=dataset,
                       processing_class=tokenizer, peft_config=LoraConfig(**LORA))


class Snapshots(TrainerCallback):
    """Trainable weights before training (index 0) and after every optimizer step (index = step)."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, []

    def take(self):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_begin(self, args, state, control, **kwargs):
        self.take()

    def on_step_end(self, args, state, control, **kwargs):
        self.take()


def same(left, right) -> bool:
    return all(torch.equal(left[n], right[n]) for n in left)


def poison_student_forward(trainer, bad_steps: set[int], micro_batches: set[int] | None = None):
    """NaN hidden states (so NaN logits) in the student forward of the given optimizer steps (counted from 1)."""
    decoder = trainer.accelerator.unwrap_model(trainer.model).get_decoder()
    calls = {"micro": 0}

    def hook(module, inputs, output):
        if not torch.is_grad_enabled():  # generation and the teacher forward run without gradient
            return output
        calls["micro"] += 1
        step = trainer.state.global_step + 1
        micro = (calls["micro"] - 1) % trainer.args.gradient_accumulation_steps
        if step in bad_steps and (micro_batches is None or micro in micro_batches):
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    return decoder.register_forward_hook(hook)


def adam_steps(trainer) -> set[int]:
    return {int(state["step"]) for state in trainer.optimizer.state.values()}


def test_nonfinite_logits_skip_the_step_and_training_goes_on(tmp_path, tokenizer, quickstart_rows, caplog):
    trainer = make_trainer(tmp_path, tokenizer, quickstart_rows)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    poison_student_forward(trainer, bad_steps={2})
    with caplog.at_level("WARNING", logger="sd_plugin"):
        result = trainer.train()
    before, after_1, after_2, after_3 = snapshots.weights
    assert not same(before, after_1)
    assert same(after_1, after_2), "the step with NaN logits changed the weights"
    assert not same(after_2, after_3), "training did not go on after the skipped step"
    assert all(torch.isfinite(t).all() for t in after_3.values())
    assert trainer.nonfinite_steps_skipped == 1
    assert adam_steps(trainer) == {2}, "the optimizer state advanced on the skipped step"
    assert trainer.state.global_step == 3
    assert "step 2 skipped: non-finite loss on 1 of 1 process(es); 1 step(s) skipped so far, 1 in a row" in caplog.text
    logged = {entry["step"]: entry for entry in trainer.state.log_history if "skipped_step_fraction" in entry}
    assert [logged[s]["skipped_step_fraction"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert all(torch.isfinite(torch.tensor(logged[s]["loss"])) for s in (1, 3))
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_error(tmp_path, tokenizer, quickstart_rows):
    trainer = make_trainer(tmp_path, tokenizer, quickstart_rows, max_steps=6, max_consecutive_nonfinite_steps=2)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    poison_student_forward(trainer, bad_steps={2, 4, 5, 6})  # step 3 is fine: the count in a row restarts
    with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row \(the last: step 5\) had a non-finite loss"
                                           r".*max_consecutive_nonfinite_steps=2.*Running long jobs"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 3
    assert len(snapshots.weights) == 5  # before, steps 1-4: step 5 raised before its end
    assert same(snapshots.weights[3], snapshots.weights[4]) and same(snapshots.weights[1], snapshots.weights[2])


def test_nonfinite_gradient_with_a_finite_loss_is_skipped(tmp_path, tokenizer, quickstart_rows):
    trainer = make_trainer(tmp_path, tokenizer, quickstart_rows)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    model = trainer.accelerator.unwrap_model(trainer.model)
    param = next(p for n, p in model.named_parameters() if p.requires_grad)
    param.register_hook(lambda grad: grad * float("inf") if trainer.state.global_step + 1 == 2 else grad)
    trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    assert same(snapshots.weights[1], snapshots.weights[2]) and not same(snapshots.weights[2], snapshots.weights[3])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses)))  # the loss was finite: only the gradient was not


def test_gradient_accumulation_skips_the_whole_step_of_one_bad_micro_batch(tmp_path, tokenizer, quickstart_rows):
    trainer = make_trainer(tmp_path, tokenizer, quickstart_rows, rows=8, per_device_train_batch_size=1,
                           gradient_accumulation_steps=2)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    poison_student_forward(trainer, bad_steps={2}, micro_batches={0})  # the first of the step's two micro-batches
    trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    assert same(snapshots.weights[1], snapshots.weights[2]), "the good micro-batch of the bad step was applied"
    assert not same(snapshots.weights[2], snapshots.weights[3])
    assert adam_steps(trainer) == {2}


@pytest.mark.parametrize(
    "loss_options",
    [dict(distillation_alpha=0.0), dict(distillation_alpha=0.5), dict(distillation_alpha=1.0),
     dict(distillation_mode="topk_logits", distillation_topk=8, distillation_add_tail=True), dict(lambda_on_policy=0.5)],
    ids=["forward-kl", "jsd", "reverse-kl", "topk-tail", "with-ce-rows"],
)
def test_debug_numerics_passes_on_real_divergences(tmp_path, tokenizer, quickstart_rows, loss_options):
    trainer = make_trainer(tmp_path, tokenizer, quickstart_rows, max_steps=2, debug_numerics=True, teacher_model_kind="ema",
                           **loss_options)
    checked = []
    real_check = trainer.check_divergence_values
    trainer.check_divergence_values = lambda out: (checked.append(out.per_token_divergence.min().item()), real_check(out))
    trainer.train()
    assert len(checked) == 2 and min(checked) >= -1e-4
    assert "record_step_metrics" not in vars(trainer)  # the debug wrapper is gone after each step


def test_debug_numerics_stops_at_a_negative_divergence(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    real_loss = base_module.chunked_distillation_loss

    def negative_kl(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        per_token = out.per_token_divergence.clone()
        per_token[0] = -0.01
        return dataclasses.replace(out, per_token_divergence=per_token)

    monkeypatch.setattr(base_module, "chunked_distillation_loss", negative_kl)
    make_trainer(tmp_path, tokenizer, quickstart_rows, max_steps=1).train()  # off by default: no check
    trainer = make_trainer(tmp_path, tokenizer, quickstart_rows, max_steps=1, debug_numerics=True)
    with pytest.raises(RuntimeError, match=r"debug_numerics: 1 of \d+ per-token divergences of step 1 are below -0.0001 \(min -0.01\)"):
        trainer.train()


def test_debug_numerics_tolerates_rounding_and_skips_the_sampled_estimator(tmp_path, tokenizer, quickstart_rows):
    trainer = make_trainer(tmp_path, tokenizer, quickstart_rows, max_steps=1, debug_numerics=True)
    trainer.check_divergence_values(DistillationOutput(torch.tensor(0.0), torch.tensor([0.1, -5e-5, float("nan")]), None, None))
    with pytest.raises(RuntimeError, match="min -0.001"):
        trainer.check_divergence_values(DistillationOutput(torch.tensor(0.0), torch.tensor([0.1, -1e-3]), None, None))
    trainer.options.distillation_mode = "sampled_token"  # log p - log q of one sampled token is negative for some tokens
    trainer.check_divergence_values(DistillationOutput(torch.tensor(0.0), torch.tensor([0.1, -1e-3]), None, None))


def test_max_consecutive_nonfinite_steps_is_checked():
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps must be >= 1, got 0"):
        SDFTOptions(max_consecutive_nonfinite_steps=0).check()
    assert SDFTOptions().max_consecutive_nonfinite_steps == 3 and SDFTOptions().debug_numerics is False
