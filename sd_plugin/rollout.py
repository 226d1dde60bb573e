"""On-policy sampling: the student generates its own completions.

`generate_rollouts` uses transformers' `generate` (KV cache on) and returns token ids plus a mask that
covers each completion through its first end-of-turn token. Another engine (vLLM, `sd_plugin.vllm_rollout`)
only has to return the same `Rollouts`; `rollouts_from_token_lists` builds them from an engine's lists.

Samples come from the student's own distribution, shaped only by the options (temperature, top-p, top-k):
nothing of the checkpoint's `generation_config.json` (repetition_penalty, no_repeat_ngram_size, min_p,
suppress_tokens, forced tokens, ...) takes part, since nothing downstream corrects for it. The same builder
(`generation_config`) and the same call (`generate_rollouts`) serve the trainers' rollouts, `generate`,
`collect-revisions` and the held-out evaluation (greedy with `do_sample=False`), so an evaluation's "greedy"
is argmax decoding of the model itself, whatever its checkpoint ships.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SamplingOptions:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    num_generations: int = 1
    # Also return each sampled token's log-prob under the distribution it was drawn from (Rollouts.old_logprobs).
    record_logprobs: bool = False
    # Run the prompt's prefill through the cache in chunks of this many tokens (None: one forward over the prompt).
    prefill_chunk_size: int | None = None
    # False: greedy (argmax) decoding; temperature, top-p and top-k are then not used (the evaluation's greedy).
    do_sample: bool = True


@dataclass
class Rollouts:
    completion_ids: torch.Tensor     # [N, C], right-padded with pad_token_id
    completion_mask: torch.Tensor    # [N, C], 1 through the first eos
    prompt_index: torch.Tensor       # [N], which prompt of the batch each completion answers
    truncated: torch.Tensor          # [N] bool, hit max_new_tokens without an eos
    # [N, C] log-prob of each sampled token under the distribution the sampler drew it from (after temperature,
    # top-k, top-p), 0 outside the mask; None when the sampler does not report them. The loss then weights each
    # token by min(exp(s_y - old_y), distillation_is_clip).
    old_logprobs: torch.Tensor | None = None


class RolloutBackend(Protocol):
    def __call__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options: SamplingOptions,
                 eos_token_ids: list[int], pad_token_id: int) -> Rollouts: ...


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask through the first eos (inclusive) and whether each row ended without one."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~seen_before).long(), ~is_eos.any(-1)


def generation_config(options: SamplingOptions, eos_token_ids: list[int], pad_token_id: int):
    """The complete `GenerationConfig` of every generate() call of the project: sampling or greedy, no other
    logits processor.

    Temperature, top-k and top-p are not in it: `sampling_logits_processors` applies them, so that the
    log-prob recorder can read the very scores that are sampled from (generate runs user processors before
    its own warpers). Every other processor is off: `generate_rollouts` keeps the checkpoint's generation
    config out of the call, which transformers would otherwise merge into any field left unset here.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        # top_k 0: no default top-50 (greedy: None, which transformers would otherwise flag as an unused flag)
        do_sample=options.do_sample, num_beams=1, temperature=1.0, top_k=0 if options.do_sample else None, top_p=1.0,
        max_new_tokens=options.max_new_tokens, eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id,
        bos_token_id=None, use_cache=True, disable_compile=True, prefill_chunk_size=options.prefill_chunk_size,
    )


def sampling_logits_processors(options: SamplingOptions):
    """Temperature, then top-k, then top-p: the order generate() itself applies them in."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList()
    if not options.do_sample:  # greedy: the argmax of the model's own scores
        return processors
    if options.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(options.temperature))
    if options.top_k:
        processors.append(TopKLogitsWarper(options.top_k))
    if options.top_p < 1.0:
        processors.append(TopPLogitsWarper(options.top_p))
    return processors


class SampledTokenLogprobs:
    """Logits processor placed last: records log q(y_t) of each sampled token, q = softmax(final scores).

    At step t it keeps the step's scores and their logsumexp; at step t + 1 the token drawn from them is the
    last column of input_ids. `finish` reads the last step's token from the finished sequences. Memory: one
    [N, V] scores tensor at a time (output_scores would keep all C of them).
    """

    def __init__(self):
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.values: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self._gather(input_ids[:, -1])
        self.pending = (scores, torch.logsumexp(scores.float(), dim=-1))
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        scores, normalizer = self.pending
        self.values.append(scores.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() - normalizer)
        self.pending = None

    def finish(self, completion_ids: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self._gather(completion_ids[:, len(self.values)])
        return torch.stack(self.values, dim=-1)


@contextlib.contextmanager
def generation_config_of(model, generation_config):
    """Make `generation_config` the model's own for the call (PEFT copies its own onto the base model too)."""
    from transformers import GenerationMixin

    swapped = [(module, module.generation_config) for module in model.modules()
               if isinstance(module, GenerationMixin) and getattr(module, "generation_config", None) is not None]
    try:
        for module, _ in swapped:
            module.generation_config = generation_config
        yield
    finally:
        for module, original in swapped:
            module.generation_config = original


@torch.no_grad()
def generate_rollouts(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options: SamplingOptions,
                      eos_token_ids: list[int], pad_token_id: int) -> Rollouts:
    """Sample `num_generations` completions per left-padded prompt with transformers' generate.

    The same function samples for the trainers, `generate`, `collect-revisions` and the held-out evaluation. With `options.prefill_chunk_size`
    transformers' chunked prefill fills the KV cache (and Gated DeltaNet's convolution and recurrent states) a
    chunk at a time, so the prefill's activations scale with the chunk, not the prompt; decoding is unchanged.
    """
    if options.prefill_chunk_size is not None:
        check_chunked_prefill(model, options.prefill_chunk_size)
    config = generation_config(options, eos_token_ids, pad_token_id)
    processors = sampling_logits_processors(options)
    recorder = SampledTokenLogprobs() if options.record_logprobs else None
    if recorder is not None:
        processors.append(recorder)
    was_training = model.training
    model.eval()  # also turns gradient checkpointing off, so the KV cache is used
    try:
        prompt_ids = prompt_ids.repeat_interleave(options.num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(options.num_generations, dim=0)
        with generation_config_of(model, config):
            sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                       generation_config=config, logits_processor=processors)
    finally:
        model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1]:]
    mask, truncated = completion_mask_from_ids(completion_ids, eos_token_ids)
    old_logprobs = None
    if recorder is not None:
        old_logprobs = recorder.finish(completion_ids).masked_fill(mask == 0, 0.0)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    prompt_index = torch.arange(prompt_ids.shape[0] // options.num_generations).repeat_interleave(options.num_generations)
    return Rollouts(completion_ids, mask, prompt_index.to(completion_ids.device), truncated, old_logprobs)


def check_chunked_prefill(model, chunk_size: int) -> None:
    """Refuse what transformers' chunked prefill would get wrong: it slices 2D position ids only.

    A multimodal class (e.g. Qwen3_5ForConditionalGeneration) makes [4, batch, length] rope positions, whose
    slice along the second axis would cut the batch, not the sequence.
    """
    from transformers import GenerationMixin

    if chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be >= 1 (None: off), got {chunk_size}")
    for module in model.modules():
        if isinstance(module, GenerationMixin):
            prepare = type(module)._prepare_position_ids_for_generation
            if prepare is not GenerationMixin._prepare_position_ids_for_generation:
                raise ValueError(
                    f"prefill_chunk_size: {type(module).__name__} builds multimodal rope position ids, which "
                    f"transformers' chunked prefill cannot split; load the text model (AutoModelForCausalLM) or "
                    f"unset prefill_chunk_size")
            return


def rollouts_from_token_lists(completions: list[list[int]], logprobs: list[list[float | None]] | None,
                              num_generations: int, eos_token_ids: list[int], pad_token_id: int,
                              device=None) -> Rollouts:
    """`Rollouts` from an engine's per-completion token lists (prompt-major, `num_generations` per prompt).

    Each completion is cut after its first end-of-turn token (an engine may emit more, or none when it hit its
    token cap: then `truncated`). `logprobs` are the engine's sampling log-probs of those tokens, one per token;
    a missing value (None, NaN: the engine could not report it) becomes 0, i.e. the sampler is taken to have
    been sure of that token, so the token's weight is the student's own probability (<= 1, never amplified).
    """
    if len(completions) % num_generations:
        raise ValueError(f"the engine returned {len(completions)} completions, not a multiple of num_generations={num_generations}")
    eos = set(eos_token_ids)
    kept = []
    for tokens in completions:
        tokens = [int(t) for t in tokens]
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        kept.append(tokens[:end])
    width = max(1, max((len(t) for t in kept), default=0))
    ids = torch.full((len(kept), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    for row, tokens in enumerate(kept):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    truncated = torch.tensor([not (tokens and tokens[-1] in eos) for tokens in kept], dtype=torch.bool)
    old_logprobs = None
    if logprobs is not None:
        if len(logprobs) != len(completions):
            raise ValueError(f"the engine returned {len(logprobs)} log-prob lists for {len(completions)} completions")
        old_logprobs = torch.zeros((len(kept), width), dtype=torch.float32)
        for row, (tokens, values) in enumerate(zip(kept, logprobs)):
            values = [value[0] if isinstance(value, (list, tuple)) else value for value in values[: len(tokens)]]
            if len(values) < len(tokens):
                raise ValueError(f"completion {row}: {len(tokens)} tokens but {len(values)} log-probs from the engine")
            row_values = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
            old_logprobs[row, : len(tokens)] = torch.nan_to_num(row_values, nan=0.0, posinf=0.0, neginf=0.0)
    prompt_index = torch.arange(len(kept) // num_generations).repeat_interleave(num_generations)
    if device is not None:
        ids, mask, prompt_index, truncated = ids.to(device), mask.to(device), prompt_index.to(device), truncated.to(device)
        old_logprobs = None if old_logprobs is None else old_logprobs.to(device)
    return Rollouts(ids, mask, prompt_index, truncated, old_logprobs)
