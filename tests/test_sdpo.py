"""SDPOTrainer: teacher contexts from siblings and feedback, masking, the GRPO term, verifier failures, Axolotl."""

import json
import logging
import types
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from sd_plugin import SDPOConfig, SDPOTrainer
from sd_plugin import rows as rows_module
from sd_plugin.contexts import SDPO_FEEDBACK, SDPO_SOLUTION
from sd_plugin.grpo import chunked_token_logprobs, group_advantages, grpo_loss
from sd_plugin.rollout import Rollouts
from sd_plugin.testing import build_model
from sd_plugin.trainers import base as base_module

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
REPO = Path(__file__).resolve().parents[1]


def make_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, logging_steps=1,
                    max_completion_length=12, report_to="none", save_strategy="no", learning_rate=5e-3,
                    use_cpu=True, seed=0, verifier="multiple_choice", num_generations=3)
    settings.update(overrides)
    # Two prompts per step: the batch counts completions (TRL's meaning).
    settings.setdefault("per_device_train_batch_size", 2 * settings["num_generations"])
    return SDPOConfig(**settings)


def rows(quickstart_rows, n=2):
    return Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in quickstart_rows[:n]])


# Scripted rollouts: prompt 0 gets a wrong answer with feedback, a solution, and a wrong answer without
# feedback; prompt 1 gets three failures without feedback.
TEXTS = ["wrong one", "<answer>A</answer> right", "silent miss", "nothing", "nothing here", "still nothing"]


def scripted_verifier(prompt, completion, record):
    if "right" in completion:
        return 1.0, None
    if completion == "wrong one":
        return 0.0, "the unit is wrong"
    return 0.0, None


def scripted_sampler(tokenizer, texts=TEXTS, replace=None):
    """Rollouts with the given texts; `replace` maps a row to token ids used instead (same length)."""
    def sample(self, model, prompt_ids, prompt_mask):
        completions = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        for row, make in (replace or {}).items():
            completions[row] = make(completions[row])
        ids, mask = rows_module.right_pad(completions, tokenizer.pad_token_id)
        groups = torch.arange(prompt_ids.shape[0]).repeat_interleave(self.options.num_generations)
        return Rollouts(ids, mask, groups, torch.zeros(len(texts), dtype=torch.bool))

    return sample


def build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, texts=TEXTS, **overrides):
    monkeypatch.setattr(SDPOTrainer, "sample", scripted_sampler(tokenizer, texts))
    trainer = SDPOTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, **overrides),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.verifier = scripted_verifier
    return trainer


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def teacher_texts(trainer, inputs):
    batch = trainer.prepare_step(trainer.model, inputs)
    return [None if p is None else trainer.processing_class.decode(p) for p in batch.teacher_prompts], batch


# ------------------------------------------------------------------ teacher contexts
@pytest.mark.parametrize(
    "overrides,expected",
    [
        # (solution index, feedback?) per rollout; None = no teacher signal
        ({}, [(1, True), None, (1, False), None, None, None]),
        ({"dont_reprompt_on_self_success": False}, [(1, True), (1, False), (1, False), None, None, None]),
        ({"include_environment_feedback": False}, [(1, False), None, (1, False), None, None, None]),
        ({"environment_feedback_only_without_solution": True}, [(1, False), None, (1, False), None, None, None]),
        ({"success_reward_threshold": 1.0, "no_reward_reaches_it": True}, [(None, True), None, None, None, None, None]),
    ],
)
def test_teacher_context_has_sibling_solution_and_feedback_exactly_when_it_should(
        tmp_path, tokenizer, quickstart_rows, monkeypatch, overrides, expected):
    overrides = dict(overrides)
    no_success = overrides.pop("no_reward_reaches_it", False)
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, **overrides)
    if no_success:  # every reward below the threshold (a threshold above 1 is refused by the config)
        trainer.verifier = lambda prompt, completion, record: (0.9 * scripted_verifier(prompt, completion, record)[0],
                                                               scripted_verifier(prompt, completion, record)[1])
    inputs = first_batch(trainer)
    texts, batch = teacher_texts(trainer, inputs)
    records = [json.loads(r) for r in inputs["sd_record"]]
    for i, (text, want) in enumerate(zip(texts, expected)):
        if want is None:
            assert text is None, f"rollout {i} should have no teacher signal"
            continue
        solution, feedback = want
        question = records[batch.rollouts.prompt_index[i]]["messages"][-1]["content"]
        assert question in text
        has_solution = SDPO_SOLUTION.replace("{solution}", TEXTS[1]) in text
        assert has_solution == (solution is not None), text
        assert (SDPO_FEEDBACK.replace("{feedback}", "the unit is wrong") in text) == feedback
        assert text.count("Correctly solve the original question.") == 1
    metrics = trainer._metrics["train"]
    assert metrics["self_distillation/reprompt_sample_fraction"][-1] == pytest.approx(sum(e is not None for e in expected) / 6)
    assert metrics["self_distillation/success_group_fraction"][-1] == (0.0 if overrides.get("success_reward_threshold") else 0.5)


@pytest.mark.parametrize("blank", ["", "  \n\t "])
def test_whitespace_only_feedback_builds_no_teacher_prompt(tmp_path, tokenizer, quickstart_rows, monkeypatch, blank):
    """TRL ignores feedback that is empty after stripping: no solution (every reward 0) and blank feedback: no teacher."""
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch)
    trainer.verifier = lambda prompt, completion, record: (0.0, blank if completion == "wrong one" else None)
    teacher, _ = teacher_texts(trainer, first_batch(trainer))
    assert teacher == [None] * 6
    metrics = trainer._metrics["train"]
    assert metrics["self_distillation/feedback_used_fraction"][-1] == 0.0
    assert metrics["self_distillation/reprompt_sample_fraction"][-1] == 0.0


def test_thinking_of_the_sibling_solution_is_stripped(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    texts = ["wrong one", "<think>private musing</think>\n<answer>A</answer> right", *TEXTS[2:]]
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, texts=texts)
    teacher, _ = teacher_texts(trainer, first_batch(trainer))
    assert "<answer>A</answer> right" in teacher[0] and "private musing" not in teacher[0]


def test_teacher_prompt_over_the_cap_drops_the_signal_and_counts_it(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch)
    inputs = first_batch(trainer)
    longest_prompt = max(len(ids) for ids in trainer.train_dataset["input_ids"])
    trainer.options.max_teacher_prompt_length = longest_prompt + 5  # fits the question, not question + solution
    trainer.options.max_prompt_length = longest_prompt
    texts, _ = teacher_texts(trainer, inputs)
    assert all(t is None for t in texts)
    assert trainer._metrics["train"]["self_distillation/teacher_prompt_overflow"][-1] == 2.0


# ------------------------------------------------------------------ masking
def test_rows_without_signal_contribute_zero_loss_and_zero_gradient(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, teacher_model_kind="base",
                            distillation_mode="full_logits", distillation_add_tail=False)
    inputs = first_batch(trainer)
    captured = []
    real = base_module.completion_hidden_states

    def spy(*args, **kwargs):
        hidden = real(*args, **kwargs)
        if hidden.requires_grad:
            hidden.retain_grad()
            captured.append(hidden)
        return hidden

    monkeypatch.setattr(base_module, "completion_hidden_states", spy)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grad = captured[0].grad
    with_signal, without = [0, 2], [1, 3, 4, 5]
    assert torch.count_nonzero(grad[without]) == 0
    assert all(torch.count_nonzero(grad[i]) > 0 for i in with_signal)

    # Changing what the masked rollouts of the unsolved group say (same lengths, still reward 0) leaves the loss unchanged.
    filler = tokenizer("x", add_special_tokens=False)["input_ids"][0]
    other = {row: (lambda ids: [filler] * (len(ids) - 1) + ids[-1:]) for row in (3, 4, 5)}
    monkeypatch.setattr(SDPOTrainer, "sample", scripted_sampler(tokenizer, TEXTS, other))
    with torch.no_grad():
        again = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(again, loss.detach(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ the GRPO term
def naive_token_logprobs(hidden, weight, ids):
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def naive_grpo(logprobs, old, rewards, group, mask, epsilon, reduction):
    losses = torch.zeros_like(logprobs)
    rows = rewards.numel()
    for i in range(rows):
        members = [float(rewards[j]) for j in range(rows) if j // group == i // group]
        mean = sum(members) / len(members)
        std = (sum((m - mean) ** 2 for m in members) / (len(members) - 1)) ** 0.5
        advantage = (float(rewards[i]) - mean) / (std + 1e-4)
        for t in range(logprobs.shape[1]):
            ratio = torch.exp(logprobs[i, t] - old[i, t])
            clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
            losses[i, t] = -torch.minimum(ratio * advantage, clipped * advantage)
    if reduction == "token":
        return (losses * mask).sum() / mask.sum()
    per_row = [(losses[i] * mask[i]).sum() / mask[i].sum() for i in range(rows) if mask[i].sum() > 0]
    return sum(per_row) / len(per_row)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_grpo_loss_matches_naive_value_and_gradient(reduction):
    torch.manual_seed(0)
    rows, length, hidden_size, vocab = 6, 5, 8, 40
    hidden = torch.randn(rows, length, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (rows, length))
    mask = torch.ones(rows, length)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0], dtype=torch.float64)
    old = naive_token_logprobs(hidden, weight, ids).detach() + 0.3 * torch.randn(rows, length, dtype=torch.float64)

    ours_lp = chunked_token_logprobs(hidden, weight, ids, mask, loss_chunk_size=4)
    loss, clip_fraction = grpo_loss(ours_lp, old, group_advantages(rewards, 3), mask, epsilon=0.2, loss_reduction=reduction)
    grads = torch.autograd.grad(loss, (hidden, weight))
    naive = naive_grpo(naive_token_logprobs(hidden, weight, ids), old, rewards, 3, mask, 0.2, reduction)
    naive_grads = torch.autograd.grad(naive, (hidden, weight))
    torch.testing.assert_close(loss, naive)
    for ours, reference in zip(grads, naive_grads):
        torch.testing.assert_close(ours, reference)
    assert 0 < clip_fraction < 1


def test_grpo_loss_matches_trl_sdpo_policy_loss():
    """Against TRL's own SDPOTrainer._compute_policy_loss (loss_type grpo = our sequence reduction, dapo = token)."""
    from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer as TRLSDPOTrainer

    torch.manual_seed(1)
    logits = torch.randn(4, 6, 30, requires_grad=True)
    ids = torch.randint(0, 30, (4, 6))
    mask = torch.ones(4, 6)
    mask[2, 4:] = 0
    old = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).detach() + 0.2 * torch.randn(4, 6)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    for loss_type, reduction in (("grpo", "sequence"), ("dapo", "token")):
        fake = types.SimpleNamespace(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2,
                                     loss_type=loss_type, model=types.SimpleNamespace(training=True),
                                     _metrics={"train": {"self_distillation/policy_loss": []}},
                                     accelerator=types.SimpleNamespace(gather=lambda t: t))
        inputs = {"completion_ids": ids, "completion_mask": mask, "old_per_token_logps": old, "advantages": advantages}
        theirs = TRLSDPOTrainer._compute_policy_loss(fake, inputs, logits)
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        ours, _ = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2, loss_reduction=reduction)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(theirs, logits)[0])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_policy_mode_gradient_is_the_naive_grpo_gradient(tmp_path, tokenizer, quickstart_rows, monkeypatch, temperature):
    """The whole trainer path (padding, hidden states, chunking) against GRPO computed from full logits per rollout,
    at the sampling temperature (the policy that drew the rollouts)."""
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, sdpo_mode="policy", teacher_model_kind="live",
                            temperature=temperature)
    inputs = first_batch(trainer)
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(model, inputs)
    ours = torch.autograd.grad(loss, params)

    batch = trainer.prepare_step(model, inputs)
    rewards = torch.tensor(batch.rewards)
    advantages = group_advantages(rewards, 3)
    total, rows = 0.0, 0
    for i, group in enumerate(batch.rollouts.prompt_index.tolist()):
        prompt = inputs["input_ids"][group][inputs["attention_mask"][group].bool()]
        length = int(batch.rollouts.completion_mask[i].sum())
        completion = batch.rollouts.completion_ids[i, :length]
        logits = model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0, len(prompt) - 1: -1]
        logprobs = torch.log_softmax(logits / temperature, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        # ratio = exp(logp - logp.detach()) = 1 in value; its gradient is the policy gradient.
        total = total - (torch.exp(logprobs - logprobs.detach()) * advantages[i]).sum()
        rows += length
    naive = torch.autograd.grad(total / rows, params)
    assert any(g.abs().sum() > 0 for g in ours)
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("record_logprobs", [True, False])
def test_grpo_ratio_is_one_on_policy_at_the_sampling_temperature(tmp_path, tokenizer, quickstart_rows, monkeypatch,
                                                                  record_logprobs):
    """Real sampling at temperature 0.5 with the weights that sampled: the PPO ratio is 1 and nothing is clipped,
    with the sampler's recorded log-probs (importance_sampling_correction) as old log-probs or without them."""
    import sd_plugin.trainers.sdpo as sdpo_module

    trainer = SDPOTrainer(model=build_model("qwen3", tokenizer),
                          args=make_args(tmp_path, sdpo_mode="policy", teacher_model_kind="live", temperature=0.5,
                                         max_completion_length=16, importance_sampling_correction=record_logprobs),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.verifier = lambda prompt, completion, record: (float(len(completion) % 2), None)  # unequal rewards
    seen = {}

    def spy(logprobs, old_logprobs, advantages, mask, **kwargs):
        seen.update(logprobs=logprobs.detach(), old=old_logprobs.detach(), mask=mask)
        return grpo_loss(logprobs, old_logprobs, advantages, mask, **kwargs)

    monkeypatch.setattr(sdpo_module, "grpo_loss", spy)
    trainer.model.train()
    trainer.compute_loss(trainer.model, first_batch(trainer))
    mask = seen["mask"].bool()
    assert mask.sum() > 10
    ratio = torch.exp(seen["logprobs"] - seen["old"])[mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] == 0.0
    if record_logprobs:  # the sampler's own log-probs, not a copy of the loss's
        assert trainer.prepare_step(trainer.model, first_batch(trainer)).rollouts.old_logprobs is not None


def test_hybrid_is_trls_convex_blend_of_grpo_and_distillation(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    """TRL's SDPO meaning of distillation_weight w: (1 - w) x policy loss + w x distillation loss."""
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, sdpo_mode="hybrid", distillation_weight=0.25,
                            teacher_model_kind="base")
    inputs = first_batch(trainer)
    with torch.no_grad():
        total = trainer.compute_loss(trainer.model, inputs)
    metrics = trainer._metrics["train"]
    expected = 0.75 * metrics["self_distillation/policy_loss"][-1] + 0.25 * metrics["self_distillation/distillation_loss"][-1]
    assert total.item() == pytest.approx(expected, rel=1e-5, abs=1e-8)
    assert metrics["self_distillation/distillation_loss"][-1] > 0


# ------------------------------------------------------------------ training, failures, options
def test_trains_and_logs_metrics_and_survives_a_raising_verifier(tmp_path, tokenizer, quickstart_rows, monkeypatch, caplog):
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, max_steps=2)
    calls = []

    def flaky(prompt, completion, record):
        calls.append(completion)
        if len(calls) == 2:
            raise RuntimeError("verifier crashed")
        return scripted_verifier(prompt, completion, record)

    trainer.verifier = flaky
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with caplog.at_level(logging.WARNING, logger="sd_plugin.verifiers"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "verifier crashed" in r.getMessage()]
    assert len(warnings) == 1 and "reward 0" in warnings[0] and "row" in warnings[0]
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    logged = trainer.state.log_history[0]
    for key in ("self_distillation/reward_mean", "self_distillation/reward_std", "self_distillation/success_fraction",
                "self_distillation/success_group_fraction", "self_distillation/success_sample_fraction",
                "self_distillation/feedback_used_fraction", "self_distillation/reprompt_sample_fraction",
                "completions/mean_length", "loss"):
        assert key in logged, key
    # the previous release's names, logged beside the new ones until the next release (deprecated.RENAMED_METRICS)
    assert logged["success_fraction"] == logged["self_distillation/success_fraction"]
    assert logged["no_teacher_signal_fraction"] == pytest.approx(1 - logged["self_distillation/reprompt_sample_fraction"])
    # sdpo_mode: distill: the loss is the distillation loss, logged once
    assert not {"self_distillation/distillation_loss", "distillation_loss", "self_distillation/policy_loss"} & set(logged)


def test_sampled_rollouts_are_scored_by_a_builtin_verifier(tmp_path, tokenizer, quickstart_rows):
    """Real sampling with the multiple-choice verifier: a random model gets reward 0 and format feedback."""
    trainer = SDPOTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, num_generations=2),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["self_distillation/reward_mean"] == 0.0 and logged["self_distillation/feedback_used_fraction"] == 1.0


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"sdpo_mode": "grpo"}, "sdpo_mode must be one of"),
        ({"sdpo_mode": "hybrid", "num_generations": 1}, "num_generations must be >= 2"),
        ({"distillation_weight": 0.5}, "only used with sdpo_mode=hybrid"),
        ({"sdpo_mode": "hybrid"}, r"sdpo_mode=hybrid needs 0 < distillation_weight < 1, got 1.0"),
        ({"sdpo_mode": "hybrid", "distillation_weight": 1.5}, "needs 0 < distillation_weight < 1"),
        ({"sdpo_mode": "hybrid", "distillation_weight": 0.0}, "needs 0 < distillation_weight < 1"),
        ({"epsilon": 0.3}, "only used with sdpo_mode=policy or hybrid"),
        ({"sdpo_mode": "policy"}, "set teacher_model_kind: live"),
        ({"include_environment_feedback": False, "environment_feedback_only_without_solution": True}, "needs include_environment_feedback"),
    ],
)
def test_bad_options_fail_in_the_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_no_verifier_and_no_reward_funcs_fails_when_the_trainer_is_built(tmp_path, tokenizer, quickstart_rows):
    args = make_args(tmp_path, verifier=None)  # TRL's way: SDPOTrainer(reward_funcs=...) may still complete it
    with pytest.raises(ValueError, match="verifier is required.*or reward_funcs"):
        SDPOTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=rows(quickstart_rows), processing_class=tokenizer)


def test_unknown_verifier_fails_when_the_config_is_built(tmp_path, tokenizer, quickstart_rows):
    with pytest.raises(ValueError, match="verifier: .*no_such_module"):  # before any model or data is touched
        make_args(tmp_path, verifier="no_such_module:check")


def test_missing_prompt_column_names_the_row(tmp_path, tokenizer):
    data = Dataset.from_list([{"question": "What is 2+2?", "answer": "A"}])
    with pytest.raises(ValueError, match="row 0: missing column 'prompt'"):
        SDPOTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path), train_dataset=data,
                    processing_class=tokenizer)


# ------------------------------------------------------------------ Axolotl
def test_paper_scale_config_passes_the_schema():
    import yaml

    from sd_plugin.axolotl.args import SelfDistillationArgs

    config = yaml.safe_load((REPO / "example_configs" / "sdpo-qwen3-8b-chemistry.yml").read_text())
    block = SelfDistillationArgs.model_validate(config).sdpo
    assert block["num_generations"] == 8 and block["teacher_update_rate"] == 0.05 and block["distillation_topk"] == 100
    from sd_plugin.planner import plan_memory

    plan = plan_memory(config, gpu_memory="80GB")
    assert plan.fits and plan.setup.num_generations == 8, plan.summary()


@pytest.mark.slow
def test_axolotl_train_sdpo_tiny_runs_and_logs_the_metrics(tmp_path):
    import yaml
    from test_axolotl_plugin import PLUGIN_RAN, run_axolotl

    config = yaml.safe_load((REPO / "example_configs" / "sdpo-tiny.yml").read_text())
    config.update(output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=3)
    result = run_axolotl(config, tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert PLUGIN_RAN + "sdpo" in log
    for key in ("self_distillation/reward_mean", "self_distillation/success_fraction", "self_distillation/feedback_used_fraction",
                "self_distillation/policy_loss", "self_distillation/distillation_loss"):
        assert f"'{key}'" in log, key
    assert "'memory/" not in log  # Axolotl's GPU memory metrics would be 0 on this CPU run
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_mask_uncertain_teacher_tokens_keeps_the_tokens_where_the_teacher_is_as_sure(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    """The mask against entropies from full softmaxes; the trainer's step runs with it and logs the dropped share."""
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, teacher_model_kind="base",
                            mask_uncertain_teacher_tokens=True, loss_chunk_size=3)
    torch.manual_seed(0)
    weight = torch.randn(40, 8)
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8) * torch.tensor([0.2, 3.0, 1.0, 0.5, 2.0]).view(1, 5, 1)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    kept = trainer.filter_loss_mask(None, mask, student, teacher, (weight, None), (weight, None))

    def entropy(hidden):
        logprobs = torch.log_softmax(hidden @ weight.T, -1)
        return -(logprobs.exp() * logprobs).sum(-1)

    expected = mask * (entropy(teacher) <= entropy(student))
    assert torch.equal(kept, expected)
    assert 0 < kept.sum() < mask.sum()
    trainer._metrics["train"].clear()
    inputs = first_batch(trainer)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
    dropped = trainer._metrics["train"]["self_distillation/uncertain_teacher_token_fraction"]
    assert len(dropped) == 1 and 0.0 <= dropped[0] <= 1.0


def test_mask_uncertain_teacher_tokens_is_refused_without_distillation(tmp_path):
    with pytest.raises(ValueError, match="mask_uncertain_teacher_tokens"):
        make_args(tmp_path, sdpo_mode="policy", teacher_model_kind="live", mask_uncertain_teacher_tokens=True)
