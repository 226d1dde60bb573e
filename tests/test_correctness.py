"""Behaviours that random-weight smoke tests could not see: each fails if the behaviour it names breaks."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sd_plugin import SDFTConfig, SDPOConfig
from sd_plugin.contexts import sdft_teacher_messages, sdpo_teacher_messages, strip_thinking
from sd_plugin.teacher import Teacher, output_head
from sd_plugin.testing import build_model
from sd_plugin.verifiers import load_verifier

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_adapter(tokenizer, seed=0, **lora):
    """A PEFT model whose adapter is not zero (as after round 1, or after loading `lora_model_dir`)."""
    model = get_peft_model(build_model("qwen3", tokenizer, seed=seed), LoraConfig(**{**LORA, **lora}))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model


# ---------------------------------------------------------------- teacher weights
@pytest.mark.parametrize("ema_rank", [0, 16])
def test_ema_teacher_starts_at_the_current_student_with_a_loaded_adapter(tokenizer, ema_rank):
    model = trained_adapter(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    student = logits_of(model, ids)
    teacher = Teacher(model, "ema", ema_rate=0.1, ema_rank=ema_rank)
    with teacher.scoring(model) as scorer:
        scored = logits_of(scorer, ids)
    torch.testing.assert_close(scored, student, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(logits_of(model, ids), student, atol=1e-3), "the adapter must matter for this test"


def test_initial_teacher_is_the_frozen_step0_student_and_base_is_without_adapter(tokenizer):
    model = trained_adapter(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    step0 = logits_of(model, ids)
    with model.disable_adapter():
        no_adapter = logits_of(model, ids)
    initial, base = Teacher(model, "initial"), Teacher(model, "base")
    with torch.no_grad():  # the student moves on
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.add_(0.3)
    initial.step(model, 1)
    with initial.scoring(model) as scorer:
        torch.testing.assert_close(logits_of(scorer, ids), step0, atol=1e-5, rtol=1e-5)
    with base.scoring(model) as scorer:
        torch.testing.assert_close(logits_of(scorer, ids), no_adapter)


def test_hard_sync_makes_the_teacher_equal_the_student(tokenizer):
    # TRL's hard sync: an EMA at rate 1.0, run every teacher_sync_steps steps.
    model = trained_adapter(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8]])
    teacher = Teacher(model, "ema", ema_rate=1.0, sync_steps=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.mul_(1.7)
    teacher.step(model, 1)
    with teacher.scoring(model) as scorer:
        torch.testing.assert_close(logits_of(scorer, ids), logits_of(model, ids), atol=1e-5, rtol=1e-5)


def tiny_gpt2_with_trained_conv1d_adapter():
    """A GPT-2 built here (no download) with LoRA on its Conv1D layers (fan_in_fan_out): c_attn [32 -> 96] and
    the square c_proj / c_fc [32 -> 128]; the adapter is not zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = get_peft_model(GPT2LMHeadModel(config).eval(), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("kind,rate,ema_rank", [("ema", 0.1, 0), ("ema", 0.1, 16), ("initial", 0.1, 0), ("ema", 1.0, 0),
                                                ("ema", 1.0, 8)])
def test_conv1d_lora_teachers_equal_the_student_they_copy(kind, rate, ema_rank):
    """GPT-2-style Conv1D LoRA (fan_in_fan_out): the EMA / initial teacher starts at the student, an EMA step at
    rate 1 copies it; peft's delta is in Conv1D's [in, out] layout and must be applied as [out, in]."""
    model = tiny_gpt2_with_trained_conv1d_adapter()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    teacher = Teacher(model, kind, ema_rate=rate, ema_rank=ema_rank)
    if rate == 1.0:  # the student moves on, then is copied
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.mul_(1.7)
        teacher.step(model, 1)
    student = logits_of(model, ids)
    with teacher.scoring(model) as scorer:
        torch.testing.assert_close(logits_of(scorer, ids), student, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(logits_of(model, ids), student, atol=1e-3), "the adapter must matter for this test"


def test_ema_teacher_updates_only_every_sync_steps_steps(tokenizer):
    # TRL's teacher_sync_steps: how often the EMA update runs (not a hard copy of the student).
    model = trained_adapter(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8]])
    teacher = Teacher(model, "ema", ema_rate=0.5, sync_steps=2)
    before = logits_of(model, ids)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.mul_(1.7)
    after = logits_of(model, ids)
    teacher.step(model, 1)  # not a multiple of 2: no update
    with teacher.scoring(model) as scorer:
        torch.testing.assert_close(logits_of(scorer, ids), before, atol=1e-5, rtol=1e-5)
    teacher.step(model, 2)  # an EMA step at rate 0.5: between the old and the new student
    with teacher.scoring(model) as scorer:
        moved = logits_of(scorer, ids)
    assert not torch.allclose(moved, before, atol=1e-4) and not torch.allclose(moved, after, atol=1e-4)


@pytest.mark.parametrize("lora,kind,match", [
    (dict(use_dora=True), "ema", "DoRA"),
    (dict(use_dora=True), "initial", "DoRA"),
    (dict(init_lora_weights="pissa"), "base", "teacher_model_kind: initial"),
    (dict(init_lora_weights="olora"), "base", "rewrites the base weights"),
    (dict(modules_to_save=["lm_head"]), "ema", "modules_to_save"),
])
def test_teachers_that_would_silently_differ_are_refused(tokenizer, lora, kind, match):
    model = get_peft_model(build_model("qwen3", tokenizer), LoraConfig(**{**LORA, **lora}))
    with pytest.raises(ValueError, match=match):
        Teacher(model, kind)


def test_pissa_initial_teacher_equals_the_step0_student(tokenizer):
    model = get_peft_model(build_model("qwen3", tokenizer), LoraConfig(**{**LORA, "init_lora_weights": "pissa"}))
    ids = torch.tensor([[5, 6, 7, 8]])
    with Teacher(model, "initial").scoring(model) as scorer:
        torch.testing.assert_close(logits_of(scorer, ids), logits_of(model, ids), atol=1e-4, rtol=1e-4)


def test_live_teacher_scores_in_eval_mode(tokenizer):
    model = trained_adapter(tokenizer, lora_dropout=0.5)  # B != 0, so LoRA dropout changes the output
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    teacher = Teacher(model, "live")
    with teacher.scoring(model) as scorer:
        first, second = logits_of(scorer, ids), logits_of(scorer, ids)
    torch.testing.assert_close(first, second)
    assert model.training, "the student goes back to training mode"


def test_modules_to_save_head_base_teacher_scores_with_the_original_head(tokenizer):
    model = get_peft_model(build_model("qwen3", tokenizer), LoraConfig(**{**LORA, "modules_to_save": ["lm_head"]}))
    original = model.get_output_embeddings().original_module.weight.detach().clone()
    with torch.no_grad():
        output_head(model)[0].add_(1.0)  # the student's trained copy of the head moves
    with Teacher(model, "base").scoring(model) as scorer:
        teacher_weight = output_head(scorer)[0]
    torch.testing.assert_close(teacher_weight, original)
    assert not torch.equal(output_head(model)[0], original)


def test_modules_to_save_head_trainer_loss_uses_the_original_head_for_the_teacher(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    from datasets import Dataset

    from sd_plugin import SDFTTrainer
    from sd_plugin.trainers import base as base_module

    model = get_peft_model(build_model("qwen3", tokenizer), LoraConfig(**{**LORA, "modules_to_save": ["lm_head"]}))
    with torch.no_grad():
        output_head(model)[0].add_(1.0)  # the student's head has moved away from the base head
    original = model.get_output_embeddings().original_module.weight
    seen = {}
    real = base_module.chunked_distillation_loss

    def spy(*args, **kwargs):
        seen["student"], seen["teacher"] = args[2], kwargs["teacher_lm_head_weight"]
        return real(*args, **kwargs)

    monkeypatch.setattr(base_module, "chunked_distillation_loss", spy)
    args = SDFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, max_completion_length=6,
                      report_to="none", save_strategy="no", use_cpu=True, liger_loss=False)
    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:2]])
    SDFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    assert seen["teacher"] is original
    assert seen["student"] is not original


def test_lora_on_lm_head_is_refused_with_the_key(tokenizer):
    model = get_peft_model(build_model("qwen3", tokenizer), LoraConfig(**{**LORA, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(ValueError, match="LoRA on lm_head"):
        output_head(model)


# ---------------------------------------------------------------- contexts
def test_demonstration_containing_question_placeholder_is_kept_verbatim():
    demo = 'print(f"{question} -> {answer}")'
    messages = sdft_teacher_messages([{"role": "user", "content": "Q?"}], demo, "paper")
    assert demo in messages[-1]["content"]
    assert messages[-1]["content"].startswith("Q?")


def test_sdpo_feedback_with_braces_is_kept_verbatim():
    messages = sdpo_teacher_messages([{"role": "user", "content": "Q"}], "{feedback}", "got {solution}")
    assert "{feedback}" in messages[-1]["content"] and "got {solution}" in messages[-1]["content"]


def test_strip_thinking_drops_a_thought_opened_by_the_generation_prompt():
    assert strip_thinking("reasoning here\n</think>\n\nThe answer is 4.") == "The answer is 4."
    assert strip_thinking("<think>a</think>B") == "B"
    assert strip_thinking("no thought") == "no thought"


# ---------------------------------------------------------------- names and options
def test_documented_verifier_name_tool_calls_loads_and_old_name_still_works():
    assert type(load_verifier("tool_calls")) is type(load_verifier("tool_call"))


@pytest.mark.parametrize("config_class", [SDFTConfig, SDPOConfig])
def test_ema_rate_without_ema_teacher_is_refused_everywhere(tmp_path, config_class):
    extra = {"verifier": "multiple_choice"} if config_class is SDPOConfig else {}
    with pytest.raises(ValueError, match="teacher_update_rate is set but teacher_model_kind is 'base'"):
        config_class(output_dir=str(tmp_path), teacher_model_kind="base", teacher_update_rate=0.2, use_cpu=True, report_to="none", **extra)


# ---------------------------------------------------------------- verifying special tokens
def tool_call_tag_verifier(messages, completion, record):
    """Reward 1 when the completion kept its <tool_call> tags (the tiny tokenizer marks them special)."""
    return float("<tool_call>" in completion and "</tool_call>" in completion)


def test_sdzero_verifies_completions_with_their_special_tags(tmp_path, tokenizer, monkeypatch):
    from datasets import Dataset
    from test_sdzero import chemistry_rows, encode, fixed_rollouts, make_args

    from sd_plugin.trainers.sdzero import SDZeroTrainer

    row = chemistry_rows([1])[0]
    completion = encode(tokenizer, '<tool_call>{"name": "f"}</tool_call>') + [tokenizer.eos_token_id]
    assert 5 in completion, "<tool_call> must be one special token here"
    monkeypatch.setattr(SDZeroTrainer, "sample", fixed_rollouts(tokenizer, {row["prompt"]: completion}))
    args = make_args(tmp_path, "distill", max_steps=1, verifier="test_correctness:tool_call_tag_verifier")
    trainer = SDZeroTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=Dataset.from_list([row]),
                            processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    assert trainer.state.log_history[0]["correct_fraction"] == 1.0


# ---------------------------------------------------------------- reductions over a whole optimizer step
def completions_by_prompt(tokenizer, lengths):
    """A `sample` replacement: prompt i (by its text) always gets the same completion, of length lengths[i]."""
    from sd_plugin.rollout import Rollouts
    from sd_plugin.rows import right_pad

    def sample(self, model, prompt_ids, prompt_mask):
        completions = []
        for ids, mask in zip(prompt_ids, prompt_mask):
            key = sum(ids[mask.bool()].tolist()) % len(lengths)
            completions.append([10 + (key * 7 + j) % 50 for j in range(lengths[key])] + [tokenizer.eos_token_id])
        ids, mask = right_pad(completions, tokenizer.pad_token_id)
        return Rollouts(ids, mask, torch.arange(len(completions)), torch.zeros(len(completions), dtype=torch.bool))

    return sample


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_gradient_accumulation_gives_the_same_step_as_one_big_batch(tmp_path, tokenizer, quickstart_rows, monkeypatch, reduction):
    from datasets import Dataset

    from sd_plugin import SDFTTrainer

    monkeypatch.setattr(SDFTTrainer, "sample", completions_by_prompt(tokenizer, [2, 9, 4, 13, 1, 7, 3, 11]))
    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:8]])
    results = []
    for batch, accumulation in ((8, 1), (1, 8), (2, 4)):
        args = SDFTConfig(output_dir=str(tmp_path / f"{batch}x{accumulation}"), per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=10.0,
                          lr_scheduler_type="constant", max_grad_norm=1e9, loss_reduction=reduction, report_to="none",
                          save_strategy="no", use_cpu=True, seed=0, liger_loss=False, num_loss_tokens_to_skip=1)
        trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=data,
                              processing_class=tokenizer, peft_config=LoraConfig(**LORA))
        trainer.train()
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    start = {n: p for n, p in get_peft_model(build_model("qwen3", tokenizer), LoraConfig(**LORA)).named_parameters()
             if p.requires_grad}
    assert max((results[0][n] - start[n]).abs().max().item() for n in start) > 1e-3, "the step must move the weights"
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("sdpo_mode", ["policy", "hybrid"])
def test_gradient_accumulation_gives_the_same_sdpo_step_with_the_grpo_term(tmp_path, tokenizer, quickstart_rows,
                                                                          monkeypatch, sdpo_mode):
    """SDPO's GRPO term is normalised by the whole step's completion tokens, as the distillation term by its own:
    4 prompts x 1, 1 x 4 and 2 x 2 micro-batches take the same SGD step (2 rollouts per prompt)."""
    from datasets import Dataset

    from sd_plugin import SDPOTrainer
    from sd_plugin.testing import length_parity_verifier, scripted_grouped_rollouts

    monkeypatch.setattr(SDPOTrainer, "sample", scripted_grouped_rollouts(tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                                         [2, 9, 4, 13, 1, 7, 3], 2))
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in quickstart_rows[:4]])
    mode = dict(sdpo_mode="policy", teacher_model_kind="live") if sdpo_mode == "policy" else dict(
        sdpo_mode="hybrid", distillation_weight=0.5, teacher_model_kind="base")
    results = []
    for batch, accumulation in ((4, 1), (1, 4), (2, 2)):
        args = SDPOConfig(output_dir=str(tmp_path / f"{batch}x{accumulation}"), per_device_train_batch_size=2 * batch,  # completions (TRL): 2 per prompt
                          gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=10.0,
                          lr_scheduler_type="constant", max_grad_norm=1e9, report_to="none", save_strategy="no",
                          use_cpu=True, seed=0, liger_loss=False, verifier="multiple_choice", num_generations=2, **mode)
        trainer = SDPOTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=data,
                              processing_class=tokenizer, peft_config=LoraConfig(**LORA))
        trainer.verifier = length_parity_verifier
        trainer.train()
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
        assert 0.0 < trainer.state.log_history[0]["self_distillation/reward_mean"] < 1.0  # advantages are not all 0
    start = {n: p for n, p in get_peft_model(build_model("qwen3", tokenizer), LoraConfig(**LORA)).named_parameters()
             if p.requires_grad}
    assert max((results[0][n] - start[n]).abs().max().item() for n in start) > 1e-3, "the step must move the weights"
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], atol=1e-6, rtol=1e-4)


def test_lambda_on_policy_draws_per_example_per_micro_batch_and_per_process(tmp_path, tokenizer, quickstart_rows):
    from datasets import Dataset

    from sd_plugin import SDFTTrainer

    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:4]])

    def draws(process_index=0):
        args = SDFTConfig(output_dir=str(tmp_path), lambda_on_policy=0.5, report_to="none", use_cpu=True, seed=3)
        trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=data, processing_class=tokenizer)
        trainer.accelerator.state._shared_state["process_index"] = process_index  # as on another rank
        try:
            return [tuple(trainer.on_policy_rows(4, "cpu").tolist()) for _ in range(8)]  # 8 micro-batches of one step
        finally:
            trainer.accelerator.state._shared_state["process_index"] = 0

    first = draws()
    assert len(set(first)) > 1, "micro-batches of one step must draw independently"
    assert any(True in d and False in d for d in first), "rows of a micro-batch must draw independently"
    assert draws() == first, "a resumed run draws what the uninterrupted one drew"
    assert draws(process_index=1) != first
