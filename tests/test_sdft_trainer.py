"""SDFTTrainer on tiny local models: it trains, the teacher sees what it should, bad input fails early."""

import copy
import types

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from sd_plugin import SDFTConfig, SDFTTrainer
from sd_plugin.rollout import Rollouts
from sd_plugin.testing import build_model
from sd_plugin.trainers import base as base_module

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
QWEN35_LORA = dict(LORA, target_modules=["q_proj", "v_proj", "in_proj_qkv", "in_proj_z", "out_proj"])


def make_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                    max_completion_length=12, report_to="none", save_strategy="no", learning_rate=5e-3,
                    use_cpu=True, seed=0)
    settings.update(overrides)
    return SDFTConfig(**settings)


def rows(quickstart_rows, n=4):
    return Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:n]])


def trainable_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "kind,teacher,use_lora",
    [("qwen3", "base", True), ("qwen3", "ema", True), ("qwen3", "base", False), ("qwen3", "ema", False),
     ("qwen3_5", "base", True)],
)
def test_trains_and_moves_parameters(tmp_path, tokenizer, quickstart_rows, kind, teacher, use_lora):
    model = build_model(kind, tokenizer)
    lora = LoraConfig(**(QWEN35_LORA if kind == "qwen3_5" else LORA)) if use_lora else None
    trainer = SDFTTrainer(model=model, args=make_args(tmp_path, teacher_model_kind=teacher), train_dataset=rows(quickstart_rows),
                          processing_class=tokenizer, peft_config=lora)
    before = trainable_snapshot(trainer.model)
    result = trainer.train()
    after = trainable_snapshot(trainer.model)
    assert torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved, "no trainable parameter moved"
    if use_lora:
        assert all("lora_" in n for n in before)
    logged = trainer.state.log_history[0]
    for key in ("loss", "completions/mean_length", "teacher_prompt_length", "teacher_student_logprob_gap"):
        assert key in logged


def test_student_and_teacher_score_the_same_ids_at_a_tokenization_boundary(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    """A completion whose text would re-tokenize differently is scored token for token as sampled."""
    merged = tokenizer("answer", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.convert_tokens_to_ids(ch) for ch in "answer"]
    assert len(merged) < len(pieces), "the boundary case needs a merge"
    assert tokenizer(tokenizer.decode(pieces), add_special_tokens=False)["input_ids"] == merged
    completion = pieces + [tokenizer.eos_token_id]

    def fake_sample(self, model, prompt_ids, prompt_mask):
        n = prompt_ids.shape[0]
        ids = torch.tensor([completion] * n)
        return Rollouts(ids, torch.ones_like(ids), torch.arange(n), torch.zeros(n, dtype=torch.bool))

    seen = []
    real = base_module.completion_hidden_states

    def spy(unwrapped, model, prompt_ids, prompt_mask, completion_ids, completion_mask, **tiling):
        seen.append((prompt_ids.clone(), prompt_mask.clone(), completion_ids.clone()))
        return real(unwrapped, model, prompt_ids, prompt_mask, completion_ids, completion_mask, **tiling)

    monkeypatch.setattr(SDFTTrainer, "sample", fake_sample)
    monkeypatch.setattr(base_module, "completion_hidden_states", spy)
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, max_steps=1),
                          train_dataset=rows(quickstart_rows, 2), processing_class=tokenizer,
                          peft_config=LoraConfig(**LORA))
    trainer.train()
    # The teacher's no-grad forward runs first (its working memory never meets the student's activations).
    (teacher_prompt, teacher_mask, teacher_completion), (student_prompt, student_mask, student_completion) = seen
    assert student_completion.tolist() == [completion] * 2
    assert teacher_completion.tolist() == [completion] * 2

    demonstration = quickstart_rows[0]["demonstration"]
    student_text = tokenizer.decode(student_prompt[0][student_mask[0].bool()])
    teacher_text = tokenizer.decode(teacher_prompt[0][teacher_mask[0].bool()])
    question = quickstart_rows[0]["prompt"][-1]["content"]
    assert question in student_text and question in teacher_text
    assert demonstration in teacher_text
    assert demonstration not in student_text and "This is an example" not in student_text


def test_left_padded_hidden_states_equal_unpadded_forward(tokenizer):
    model = build_model("qwen3", tokenizer).eval()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    completion = torch.tensor([[20, 21, 22], [20, 21, 22]])
    prompt_ids, prompt_mask = base_module.left_pad([short, long], tokenizer.pad_token_id)
    with torch.no_grad():
        batched = base_module.completion_hidden_states(model, model, prompt_ids, prompt_mask, completion, torch.ones_like(completion))
        alone = model.model(torch.tensor([short + [20, 21, 22]])).last_hidden_state[:, len(short) - 1: len(short) + 2]
    torch.testing.assert_close(batched[0:1], alone, atol=1e-5, rtol=1e-4)


def test_lora_ema_teacher_is_ema_of_the_effective_update(tmp_path, tokenizer, quickstart_rows):
    from sd_plugin.teacher import lora_delta, lora_layers

    rate = 0.3
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, teacher_model_kind="ema", teacher_update_rate=rate, max_steps=3),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    expected = {name: torch.zeros_like(lora_delta(m)) for name, m in lora_layers(trainer.model).items()}

    class Record(base_module.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            for name, module in lora_layers(trainer.model).items():
                expected[name] = (1 - rate) * expected[name] + rate * lora_delta(module)

    trainer.callback_handler.callbacks.insert(0, Record())
    trainer.train()
    for name, delta in trainer.teacher.deltas.items():
        torch.testing.assert_close(delta, expected[name])
        assert delta.abs().sum() > 0
    # The EMA of the factors would be a different (wrong) teacher.
    module = next(iter(lora_layers(trainer.model).values()))
    assert module.lora_B["default"].weight.abs().sum() > 0


def test_ema_teacher_state_is_saved_and_restored(tmp_path, tokenizer, quickstart_rows):
    args = make_args(tmp_path, teacher_model_kind="ema", teacher_update_rate=0.5, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=rows(quickstart_rows),
                          processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    saved = copy.deepcopy(trainer.teacher.deltas)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / base_module.TEACHER_STATE_FILE).exists()
    fresh = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, teacher_model_kind="ema", teacher_update_rate=0.5, max_steps=2),
                        train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    fresh.train(resume_from_checkpoint=str(checkpoint))
    for name, delta in saved.items():
        torch.testing.assert_close(fresh.teacher.deltas[name], delta)


def test_full_finetuning_teacher_is_an_in_memory_frozen_copy(tmp_path, tokenizer, quickstart_rows):
    model = build_model("qwen3", tokenizer)
    initial = copy.deepcopy(model.state_dict())
    trainer = SDFTTrainer(model=model, args=make_args(tmp_path, teacher_model_kind="base"), train_dataset=rows(quickstart_rows), processing_class=tokenizer)
    trainer.train()
    assert trainer.teacher.copy is not model
    for name, tensor in trainer.teacher.copy.state_dict().items():
        torch.testing.assert_close(tensor, initial[name])
    assert not any(p.requires_grad for p in trainer.teacher.copy.parameters())


def test_lambda_on_policy_zero_is_cross_entropy_on_the_demonstration(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("off-policy rows must not sample")

    monkeypatch.setattr(SDFTTrainer, "sample", no_sampling)
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, lambda_on_policy=0.0, num_loss_tokens_to_skip=0),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["on_policy_fraction"] == 0.0 and "ce_loss" in logged and "kl" not in logged


def test_teacher_prompt_cut_keeps_the_question_and_counts_tokens(tmp_path, tokenizer, quickstart_rows):
    row = dict(prompt="What is 2 + 2? Answer briefly.", demonstration="four " * 400 + "THE END")
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, max_teacher_prompt_length=200, max_prompt_length=100, max_steps=1),
                          train_dataset=Dataset.from_list([row, row]), processing_class=tokenizer)
    prepared = trainer.train_dataset[0]
    teacher_text = tokenizer.decode(prepared["teacher_input_ids"])
    assert len(prepared["teacher_input_ids"]) <= 200
    assert "What is 2 + 2? Answer briefly." in teacher_text and "THE END" in teacher_text
    assert prepared["teacher_truncated_tokens"] > 0
    trainer.train()
    assert trainer.state.log_history[0]["teacher_truncated_tokens"] > 0


@pytest.mark.parametrize(
    "overrides,data,match",
    [
        ({}, [{"question": "q", "demonstration": "d"}], "row 0: missing column 'prompt'"),
        ({}, [{"prompt": "q", "demonstration": "ok"}, {"prompt": "q", "demonstration": "  "}], "row 1: the demonstration is empty"),
        ({"distillation_mode": "topk_logits", "distillation_topk": 5000}, None, "topk=5000 is larger than the vocabulary"),
        ({"teacher_truncation": "error", "max_teacher_prompt_length": 230, "max_prompt_length": 230}, None, "row 0: the teacher prompt has"),
        ({"max_prompt_length": 10, "max_teacher_prompt_length": 100}, None, "row 0: the student prompt has"),
    ],
)
def test_bad_input_fails_before_training_naming_row_or_key(tmp_path, tokenizer, quickstart_rows, overrides, data, match):
    dataset = Dataset.from_list(data) if data else rows(quickstart_rows, 2)
    with pytest.raises(ValueError, match=match):
        SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, **overrides), train_dataset=dataset,
                    processing_class=tokenizer)


@pytest.mark.parametrize(
    "overrides,match",
    [({"distillation_alpha": 1.5}, "alpha must be in"), ({"distillation_mode": "sampled_token", "distillation_alpha": 0.5}, "alpha=1.0"),
     ({"max_teacher_prompt_length": 10, "max_prompt_length": 100}, "max_teacher_prompt_length"),
     ({"teacher_model_kind": "frozen"}, "teacher_model_kind must be")],
)
def test_bad_options_fail_in_the_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_skip_invalid_reports_and_keeps_the_bad_rows(tmp_path, tokenizer, quickstart_rows):
    data = Dataset.from_list([{"prompt": "q", "demonstration": "fine"}, {"prompt": "", "demonstration": "x"}, {"prompt": "q2", "demonstration": "ok"}])
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, skip_invalid=True), train_dataset=data,
                          processing_class=tokenizer)
    assert len(trainer.train_dataset) == 2
    import json

    written = [json.loads(line) for line in open(tmp_path / "out" / "invalid_rows_train.jsonl")]
    assert written == [{"row": 1, "reason": "the prompt is empty", "record": {"prompt": "", "demonstration": "x"}}]


def liger_step_loss(tmp_path, tokenizer, quickstart_rows, monkeypatch, liger_loss):
    completion = tokenizer("<answer>C</answer>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def fixed_sample(self, model, prompt_ids, prompt_mask):
        ids = torch.tensor([completion] * prompt_ids.shape[0])
        return Rollouts(ids, torch.ones_like(ids), torch.arange(ids.shape[0]), torch.zeros(ids.shape[0], dtype=torch.bool))

    monkeypatch.setattr(SDFTTrainer, "sample", fixed_sample)
    used = []
    real = base_module.liger_distillation_loss
    monkeypatch.setattr(base_module, "liger_distillation_loss", lambda *a, **k: used.append(1) or real(*a, **k))
    torch.manual_seed(0)
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, liger_loss=liger_loss),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, inputs)
    grads = torch.autograd.grad(loss, [p for p in trainer.model.parameters() if p.requires_grad])
    return loss.detach(), grads, bool(used)


def test_liger_loss_option_gives_the_reference_step(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    fused, fused_grads, used = liger_step_loss(tmp_path, tokenizer, quickstart_rows, monkeypatch, True)
    reference, reference_grads, used_reference = liger_step_loss(tmp_path, tokenizer, quickstart_rows, monkeypatch, None)
    assert used and not used_reference, "auto must not pick Liger on CPU; true must"
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-7)
    for a, b in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
def test_liger_loss_is_the_default_on_a_gpu(tokenizer):
    trainer = types.SimpleNamespace(options=SDFTConfig(output_dir="/tmp/unused", report_to="none"))
    batch = types.SimpleNamespace(ce_rows=torch.zeros(1, dtype=torch.bool), rollouts=types.SimpleNamespace(old_logprobs=None))
    hidden = torch.zeros(1, 1, 8, device="cuda")
    assert SDFTTrainer.use_liger_loss(trainer, hidden, batch)


def test_liger_loss_true_rejects_topk(tmp_path):
    with pytest.raises(ValueError, match="liger_loss: true supports distillation_mode: full_logits only"):
        make_args(tmp_path, liger_loss=True, distillation_mode="topk_logits", distillation_topk=5)


# ------------------------------------------------------------------ low-rank EMA teacher
def test_low_rank_ema_is_exact_until_its_rank_then_the_best_approximation():
    from sd_plugin.teacher import low_rank_ema

    torch.manual_seed(0)
    out_features, in_features, r, rate = 40, 30, 4, 0.3
    updates = [(torch.randn(out_features, r), torch.randn(r, in_features)) for _ in range(5)]
    dense = torch.zeros(out_features, in_features)
    up, down = torch.zeros(out_features, 0), torch.zeros(0, in_features)
    for step, (b, a) in enumerate(updates):
        dense = (1 - rate) * dense + rate * b @ a
        up, down, error = low_rank_ema(up, down, b, a, rate, rank=16)
        if (step + 1) * r <= 16:  # the EMA's rank is (step + 1) * r: exact while it fits
            assert error == 0.0
            torch.testing.assert_close(up @ down, dense, rtol=1e-4, atol=1e-5)
        else:
            assert up.shape[1] == 16 and down.shape[0] == 16
            # Eckart-Young: the truncation is the best rank-16 approximation, and the reported error is its error.
            best = torch.linalg.svd(dense)
            best16 = (best.U[:, :16] * best.S[:16]) @ best.Vh[:16]
            torch.testing.assert_close(up @ down, best16, rtol=1e-3, atol=1e-4)
            relative = (torch.linalg.norm(dense - up @ down) / torch.linalg.norm(dense)).item()
            assert error == pytest.approx(relative, rel=1e-3, abs=1e-6)


def test_low_rank_ema_teacher_follows_the_dense_one(tmp_path, tokenizer, quickstart_rows):
    """The same run with teacher_ema_rank 0 (dense, exact) and 32 (>= 3 steps x lora r 4, so still exact)."""
    from sd_plugin.teacher import lora_layers

    trainers = {}
    for rank in (0, 32):
        torch.manual_seed(0)
        trainer = SDFTTrainer(model=build_model("qwen3", tokenizer),
                              args=make_args(tmp_path / str(rank), teacher_model_kind="ema", teacher_update_rate=0.3, max_steps=3,
                                             teacher_ema_rank=rank),
                              train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
        trainer.train()
        trainers[rank] = trainer
    dense, low = trainers[0].teacher, trainers[32].teacher
    assert not low.deltas and low.factors.keys() == dense.deltas.keys()
    for name, delta in dense.deltas.items():
        up, down = low.factors[name]
        assert up.shape[1] == 12  # 3 steps x rank 4: still exact
        torch.testing.assert_close(up @ down, delta, rtol=1e-4, atol=1e-6)
    assert trainers[32].state.log_history[0]["teacher_ema_truncation_error"] == 0.0
    # Restored from a checkpoint's state dict, the factors give the same teacher forward.
    state = {k: v.clone() for k, v in low.state_dict().items()}
    for name in low.factors:
        low.factors[name] = (low.factors[name][0] * 0, low.factors[name][1])
    low.load_state_dict(state)
    model = trainers[32].model
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), low.scoring(model) as teacher_model:
        restored = teacher_model(input_ids=ids).logits
    with torch.no_grad(), dense.scoring(trainers[0].model) as teacher_model:
        reference = teacher_model(input_ids=ids).logits
    torch.testing.assert_close(restored, reference, rtol=1e-4, atol=1e-5)
    assert next(iter(lora_layers(model).values()))  # still a LoRA model


def test_teacher_ema_rank_without_an_ema_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_ema_rank is set but teacher_model_kind is 'base'"):
        make_args(tmp_path, teacher_ema_rank=16)
