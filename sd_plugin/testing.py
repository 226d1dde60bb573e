"""Tiny local models and tokenizers for tests, the quickstart and the Colab smoke mode.

Nothing here touches the Hugging Face Hub: the tokenizer is a byte-level BPE trained on the text you
pass in, and the models are random-weight Qwen3 / Qwen3.5 built from small configs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# A compact Qwen-style ChatML template: system / user / assistant (with tool calls) / tool turns,
# tool schemas rendered into the system turn, and an assistant generation prompt.
CHAT_TEMPLATE = (
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\nCall a tool with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "\n<tool_call>{\"name\": \"{{ fn.name }}\", \"arguments\": "
    "{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=131072,
    )


def tiny_config(kind: str, vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, **overrides):
    """A small random-weight config: kind is "qwen3" or "qwen3_5" (text trunk, mixed attention)."""
    if kind == "qwen3":
        from transformers import Qwen3Config

        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
        )
        kwargs.update(overrides)
        return Qwen3Config(**kwargs)
    if kind == "qwen3_5":
        from transformers import Qwen3_5TextConfig

        # full_attention_interval 2: layer 0 is Gated DeltaNet (linear attention), layer 1 full attention.
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            full_attention_interval=2,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
        )
        kwargs.update(overrides)
        return Qwen3_5TextConfig(**kwargs)
    raise ValueError(f"unknown tiny model kind {kind!r}: expected 'qwen3' or 'qwen3_5'")


def build_model(kind: str, tokenizer, *, seed: int = 0, vocab_size: int | None = None, **config_overrides):
    """A random-weight causal LM of `kind` sized for CPU tests, in fp32 (vocab_size: default the tokenizer's)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, vocab_size or len(tokenizer), **config_overrides)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def scripted_grouped_rollouts(eos_token_id: int, pad_token_id: int, lengths: list[int], num_generations: int):
    """A `sample` replacement for the trainers (tests of SDPO's GRPO term): rollout g of a prompt always gets the
    same completion, chosen from the prompt's token ids, whatever the process, RNG or micro-batch; lengths differ
    within a group, so do the rewards of `length_parity_verifier`."""
    import torch

    from sd_plugin.rollout import Rollouts
    from sd_plugin.rows import right_pad

    def sample(self, model, prompt_ids, prompt_mask):
        completions = []
        for ids, mask in zip(prompt_ids, prompt_mask):
            key = sum(ids[mask.bool()].tolist())
            for g in range(num_generations):
                length = lengths[(key + g) % len(lengths)]
                completions.append([10 + (key * 7 + 3 * g + j) % 50 for j in range(length)] + [eos_token_id])
        ids, mask = right_pad(completions, pad_token_id)
        index = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat_interleave(num_generations)
        return Rollouts(ids.to(prompt_ids.device), mask.to(prompt_ids.device), index,
                        torch.zeros(len(completions), dtype=torch.bool, device=prompt_ids.device))

    return sample


def length_parity_verifier(prompt, completion, record):
    """Reward 1 for an odd number of characters; feedback on a miss (a teacher prompt for SDPO's distillation)."""
    return (1.0, None) if len(completion) % 2 else (0.0, "Say it in an odd number of characters.")
