"""Rollout sampling: the student's own distribution, and the sampler's log-probs for the importance weight."""

import copy

import pytest
import torch

from sd_plugin.rollout import SamplingOptions, generate_rollouts, rollouts_from_token_lists
from sd_plugin.testing import build_model

OPTIONS = SamplingOptions(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, num_generations=2)


def polluted(model):
    """A copy whose checkpoint generation_config would reshape sampling if generate merged it in."""
    model = copy.deepcopy(model)
    config = model.generation_config
    config.repetition_penalty = 3.0
    config.no_repeat_ngram_size = 2
    config.suppress_tokens = list(range(10, 400))
    config.min_p = 0.2
    config.top_k = 5
    config.min_new_tokens = 12
    return model


def prompts():
    ids = torch.randint(5, 500, (2, 6), generator=torch.Generator().manual_seed(3))
    ids[1, :2] = 0  # a left-padded row
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def reference_sample(model, tokenizer, ids, mask, options, seed):
    """Plain transformers sampling with an explicit, clean GenerationConfig (what the options mean)."""
    from transformers import GenerationConfig

    clean = copy.deepcopy(model)
    clean.generation_config = GenerationConfig()
    config = GenerationConfig(do_sample=True, temperature=options.temperature, top_p=options.top_p,
                              top_k=options.top_k or 0, max_new_tokens=options.max_new_tokens,
                              eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    out = clean.generate(input_ids=ids.repeat_interleave(options.num_generations, 0),
                         attention_mask=mask.repeat_interleave(options.num_generations, 0), generation_config=config)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("use_lora", [False, True])
def test_rollouts_sample_from_the_options_alone_not_the_checkpoint_generation_config(tokenizer, use_lora):
    model = build_model("qwen3", tokenizer)
    ids, mask = prompts()
    expected = reference_sample(model, tokenizer, ids, mask, OPTIONS, seed=1)
    student = polluted(model)
    if use_lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    rollouts = generate_rollouts(student, ids, mask, OPTIONS, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    sampled = expected.masked_fill(rollouts.completion_mask == 0, tokenizer.pad_token_id)
    assert torch.equal(rollouts.completion_ids, sampled)
    # The checkpoint's own config is left as it was.
    assert student.generation_config.repetition_penalty == 3.0


def test_collect_revisions_samples_with_the_same_clean_config(tokenizer):
    from sd_plugin.revisions import RevisionOptions, _Collector

    model = build_model("qwen3", tokenizer)
    options = RevisionOptions(verifier="multiple_choice", max_new_tokens=10, temperature=0.8, top_p=0.95)
    prompt_lists = [[11, 12, 13, 14], [21, 22]]
    torch.manual_seed(5)
    clean = _Collector(model, tokenizer, options).sample(prompt_lists, 2)
    torch.manual_seed(5)
    dirty = _Collector(polluted(model), tokenizer, options).sample(prompt_lists, 2)
    assert dirty == clean


def full_forward_sampling_logprobs(model, ids, mask, completion_ids, options):
    """log q(y_t): q the distribution generate samples from (temperature, top-k, top-p on the model's logits)."""
    from sd_plugin.rollout import sampling_logits_processors

    ids = ids.repeat_interleave(options.num_generations, 0)
    mask = mask.repeat_interleave(options.num_generations, 0)
    full = torch.cat([ids, completion_ids], 1)
    full_mask = torch.cat([mask, torch.ones_like(completion_ids)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=positions).logits.float()
    processors = sampling_logits_processors(options)
    values = []
    for t in range(completion_ids.shape[1]):
        scores = processors(full[:, : ids.shape[1] + t], logits[:, ids.shape[1] + t - 1].clone())
        values.append(torch.log_softmax(scores, -1).gather(-1, completion_ids[:, t: t + 1]).squeeze(-1))
    return torch.stack(values, -1)


def test_recorded_logprobs_are_those_of_the_distribution_sampled_from(tokenizer):
    model = build_model("qwen3", tokenizer).eval()
    ids, mask = prompts()
    options = SamplingOptions(**{**vars(OPTIONS), "record_logprobs": True})
    torch.manual_seed(2)
    rollouts = generate_rollouts(model, ids, mask, options, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    expected = full_forward_sampling_logprobs(model, ids, mask, rollouts.completion_ids, options)
    in_mask = rollouts.completion_mask.bool()
    torch.testing.assert_close(rollouts.old_logprobs[in_mask], expected[in_mask], atol=1e-4, rtol=0)
    assert (rollouts.old_logprobs[~in_mask] == 0).all()
    # Recording reads the scores only: the same seed draws the same tokens.
    torch.manual_seed(2)
    plain = generate_rollouts(model, ids, mask, OPTIONS, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert torch.equal(plain.completion_ids, rollouts.completion_ids) and plain.old_logprobs is None


def test_token_lists_become_rollouts_masked_through_the_first_eos():
    eos, pad = [7, 9], 0
    completions = [[5, 6, 7, 8, 8], [4, 4, 4], [9], [3, 3, 9, 7]]
    logprobs = [[-0.1, -0.2, -0.3, -0.4, -0.5], [[-1.0], [None], [-1.5]], [-2.0], [-0.5, float("nan"), -0.7, -9.0]]
    rollouts = rollouts_from_token_lists(completions, logprobs, 2, eos, pad)
    assert rollouts.completion_ids.tolist() == [[5, 6, 7], [4, 4, 4], [9, 0, 0], [3, 3, 9]]
    assert rollouts.completion_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert rollouts.truncated.tolist() == [False, True, False, False]
    assert rollouts.prompt_index.tolist() == [0, 0, 1, 1]
    # Missing / NaN engine log-probs become 0 (weight = the student's probability, never amplified).
    torch.testing.assert_close(rollouts.old_logprobs, torch.tensor(
        [[-0.1, -0.2, -0.3], [-1.0, 0.0, -1.5], [-2.0, 0.0, 0.0], [-0.5, 0.0, -0.7]]))
    assert rollouts_from_token_lists(completions, None, 2, eos, pad).old_logprobs is None


@pytest.mark.parametrize("completions,logprobs,match", [
    ([[1], [2], [3]], None, "not a multiple of num_generations"),
    ([[1, 2], [3, 4]], [[-0.1, -0.2], [-0.3]], "2 tokens but 1 log-probs"),
    ([[1, 2], [3, 4]], [[-0.1, -0.2]], "1 log-prob lists for 2 completions"),
])
def test_inconsistent_engine_output_fails_clearly(completions, logprobs, match):
    with pytest.raises(ValueError, match=match):
        rollouts_from_token_lists(completions, logprobs, 2, [9], 0)


def importance_run(tmp_path, tokenizer, quickstart_rows, **overrides):
    from datasets import Dataset

    from sd_plugin import SDFTConfig, SDFTTrainer

    model = build_model("qwen3", tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked next-token distributions: temperature then matters
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                    max_completion_length=10, report_to="none", save_strategy="no", learning_rate=1e-3,
                    use_cpu=True, seed=0, importance_sampling_correction=True, distillation_is_clip=1.5)
    settings.update(overrides)
    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:2]])
    trainer = SDFTTrainer(model=model, args=SDFTConfig(**settings), train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer.state.log_history[0]


def test_importance_weights_are_one_when_the_sampler_is_the_student(tmp_path, tokenizer, quickstart_rows):
    logged = importance_run(tmp_path, tokenizer, quickstart_rows, temperature=1.0, distillation_temperature=1.0)
    assert logged["importance_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert logged["importance_weight_max"] == pytest.approx(1.0, abs=1e-3)
    assert logged["importance_weight_clipped_fraction"] == 0.0


def test_importance_weights_correct_and_clip_a_different_sampler(tmp_path, tokenizer, quickstart_rows):
    # Rollouts drawn at temperature 3, the loss at temperature 1: the student's likely tokens were undersampled.
    logged = importance_run(tmp_path, tokenizer, quickstart_rows, temperature=3.0, distillation_temperature=1.0)
    assert logged["importance_weight_max"] > 1.5
    assert 0.0 < logged["importance_weight_clipped_fraction"] < 1.0
    assert logged["importance_weight_mean"] != pytest.approx(1.0, abs=1e-2)
    # The weights reach the loss: the same rollouts (same seed) without the correction give another loss.
    uncorrected = importance_run(tmp_path, tokenizer, quickstart_rows, temperature=3.0,
                                 distillation_temperature=1.0, importance_sampling_correction=False)
    assert uncorrected["completions/mean_length"] == logged["completions/mean_length"]
    assert uncorrected["loss"] != pytest.approx(logged["loss"], rel=1e-3)


def test_hf_generate_records_no_sampler_logprobs_by_default(tmp_path, tokenizer, quickstart_rows):
    logged = importance_run(tmp_path, tokenizer, quickstart_rows, importance_sampling_correction=None)
    assert not any(key.startswith("importance_weight") for key in logged)


# ====================================================================== chunked prefill (prefill_chunk_size)
def long_prompts(vocab):
    """Two 37-token prompts, the second left-padded by 11: with chunks of 8 its first chunk is all padding and the
    padding ends inside the second chunk; the prompt's end falls inside the fifth chunk."""
    ids = torch.randint(10, vocab, (2, 37), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :11], mask[1, :11] = 0, 0
    return ids, mask


def forward_lengths(model):
    """Record the sequence length of every decoder forward (to see that the prefill really ran in chunks)."""
    lengths = []
    decoder = model.get_decoder()
    decoder.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]),
        with_kwargs=True)
    return lengths


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_5"])
@pytest.mark.parametrize("sampling", [
    SamplingOptions(max_new_tokens=10, top_k=1, num_generations=1),  # greedy
    SamplingOptions(max_new_tokens=10, temperature=0.7, top_p=0.9, num_generations=2, record_logprobs=True),
], ids=["greedy", "sampled"])
def test_chunked_prefill_rollouts_equal_one_pass_prefill_rollouts(tokenizer, kind, sampling):
    from dataclasses import replace

    model = build_model(kind, tokenizer).eval()  # Qwen3.5: a Gated DeltaNet and a full-attention layer
    ids, mask = long_prompts(len(tokenizer))
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    lengths = forward_lengths(model)
    torch.manual_seed(7)
    whole = generate_rollouts(model, ids, mask, sampling, eos, pad)
    assert lengths[0] == 37
    lengths.clear()
    torch.manual_seed(7)
    chunked = generate_rollouts(model, ids, mask, replace(sampling, prefill_chunk_size=8), eos, pad)
    assert lengths[:5] == [8, 8, 8, 8, 5] and set(lengths[5:]) == {1}  # five prefill chunks, then decoding
    assert torch.equal(chunked.completion_ids, whole.completion_ids)
    assert torch.equal(chunked.completion_mask, whole.completion_mask)
    assert chunked.completion_mask.sum() > 10
    if sampling.record_logprobs:
        torch.testing.assert_close(chunked.old_logprobs, whole.old_logprobs, atol=1e-5, rtol=0)
        assert (whole.old_logprobs < 0).any()




@pytest.mark.parametrize("kind", ["qwen3", "qwen3_5"])
def test_chunked_prefill_through_a_peft_model_equals_one_pass(tokenizer, kind):
    from dataclasses import replace

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(kind, tokenizer, num_layers=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = long_prompts(len(tokenizer))
    options = SamplingOptions(max_new_tokens=6, temperature=0.7, record_logprobs=True)
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    lengths = forward_lengths(model.get_base_model())
    torch.manual_seed(3)
    whole = generate_rollouts(model, ids, mask, options, eos, pad)
    lengths.clear()
    torch.manual_seed(3)
    chunked = generate_rollouts(model, ids, mask, replace(options, prefill_chunk_size=16), eos, pad)
    assert lengths[:3] == [16, 16, 5]
    assert torch.equal(chunked.completion_ids, whole.completion_ids)
    torch.testing.assert_close(chunked.old_logprobs, whole.old_logprobs, atol=1e-5, rtol=0)

def multimodal_qwen3_5(tokenizer):
    """A tiny Qwen3_5ForConditionalGeneration: transformers slices position ids [batch, length] per prefill chunk,
    this class makes [4, batch, length] ones."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from sd_plugin.testing import tiny_config

    config = Qwen3_5Config(text_config=tiny_config("qwen3_5", len(tokenizer)).to_dict(),
                           vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                          "out_hidden_size": 64})
    return Qwen3_5ForConditionalGeneration(config).eval()


def test_chunked_prefill_refuses_a_model_with_multimodal_rope_positions(tokenizer):
    ids, mask = long_prompts(len(tokenizer))
    with pytest.raises(ValueError, match="prefill_chunk_size: Qwen3_5ForConditionalGeneration builds multimodal rope"):
        generate_rollouts(multimodal_qwen3_5(tokenizer), ids, mask, SamplingOptions(max_new_tokens=2, prefill_chunk_size=8),
                          [tokenizer.eos_token_id], tokenizer.pad_token_id)


def test_a_trainer_refuses_chunked_prefill_on_a_multimodal_model_when_built(tmp_path, tokenizer, quickstart_rows):
    from datasets import Dataset

    from sd_plugin import SDFTConfig, SDFTTrainer

    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:2]])
    args = SDFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, prefill_chunk_size=8)
    with pytest.raises(ValueError, match="prefill_chunk_size: Qwen3_5ForConditionalGeneration"):
        SDFTTrainer(model=multimodal_qwen3_5(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)


def test_a_trainer_step_with_chunked_prefill_equals_one_pass_prefill(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    from sd_plugin.trainers import base

    seen = []

    def recording(model, prompt_ids, prompt_mask, options, *args):
        seen.append(options.prefill_chunk_size)
        return generate_rollouts(model, prompt_ids, prompt_mask, options, *args)

    monkeypatch.setattr(base, "generate_rollouts", recording)
    one_pass = importance_run(tmp_path, tokenizer, quickstart_rows, temperature=0.8)
    chunked = importance_run(tmp_path, tokenizer, quickstart_rows, temperature=0.8, prefill_chunk_size=5)
    assert seen == [None, 5]
    assert chunked["completions/mean_length"] == one_pass["completions/mean_length"]
    assert chunked["loss"] == pytest.approx(one_pass["loss"], rel=1e-5)
    assert chunked["importance_weight_mean"] == pytest.approx(one_pass["importance_weight_mean"], rel=1e-5)


@pytest.mark.parametrize("overrides,match", [
    ({"prefill_chunk_size": 0}, "prefill_chunk_size must be >= 1"),
    ({"prefill_chunk_size": 4096, "use_vllm": True}, "with use_vllm, vLLM schedules its own prefill chunks: unset prefill_chunk_size"),
])
def test_bad_prefill_chunk_size_fails_in_the_config(overrides, match):
    from sd_plugin import SDFTConfig, SDPOConfig

    for config in (SDFTConfig, SDPOConfig):
        with pytest.raises(ValueError, match=match):
            config(output_dir="unused", report_to="none", use_cpu=True, **overrides)
