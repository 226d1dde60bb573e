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
