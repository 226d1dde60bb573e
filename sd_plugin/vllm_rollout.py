"""Rollouts from vLLM, through TRL's `trl.generation.VLLMGeneration` (colocate, or a `trl vllm-serve` server).

TRL's class owns the engine: it starts it (colocate) or connects to the server, pushes the weights (merging a
PEFT adapter, gathering FSDP / ZeRO-3 shards) and samples. This module only maps the options onto it, turns
its token lists and log-probs into `Rollouts`, and decides when the weights move: once per optimizer step,
before the first rollout that follows it, so the rollouts of step k come from the weights after step k - 1
(never in the middle of gradient accumulation).

vLLM runs with `logprobs_mode="processed_logprobs"` (TRL sets it in both modes): the log-prob it returns for
each sampled token is that of the distribution it drew from (after temperature, top-k, top-p), the quantity
`generate_rollouts(record_logprobs=True)` records, so `Rollouts.old_logprobs` means the same for both backends.
"""

from __future__ import annotations

import importlib.util

import torch

from sd_plugin.rollout import Rollouts, SamplingOptions, rollouts_from_token_lists


def vllm_generation_class():
    """TRL's VLLMGeneration (imported late: it imports vLLM, which only installs next to a CUDA torch)."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("use_vllm: true needs vLLM, which needs a CUDA GPU: pip install 'sd-plugin[vllm]'")
    try:
        from trl.generation.vllm_generation import VLLMGeneration
    except ImportError as error:
        raise ValueError(f"use_vllm: true needs trl.generation.VLLMGeneration (trl >= 1.0): {error}") from None
    return VLLMGeneration


def vllm_generation_kwargs(options, *, per_device_batch_size: int, eos_token_ids: list[int]) -> dict:
    """Keyword arguments of VLLMGeneration for the self-distillation options (besides model / accelerator / tokenizer).

    Sampling is exactly the options: no repetition penalty, no min-p, and every end-of-turn id stops a rollout
    (`stop_token_ids`), as with `generate_rollouts`.
    """
    o = options
    return dict(
        mode=o.vllm_mode,
        structured_outputs_regex=None,
        server_base_url=o.vllm_server_base_url,
        server_host=o.vllm_server_host,
        server_port=o.vllm_server_port,
        server_timeout=o.vllm_server_timeout,
        group_port=o.vllm_group_port,
        tensor_parallel_size=o.vllm_tensor_parallel_size,
        gpu_memory_utilization=o.vllm_gpu_memory_utilization,
        max_model_length=o.vllm_max_model_length or o.max_prompt_length + o.max_completion_length,
        max_num_seqs=per_device_batch_size * o.vllm_tensor_parallel_size,  # completions (TRL's batch meaning)
        enable_sleep_mode=o.vllm_enable_sleep_mode,
        model_impl=o.vllm_model_impl,
        repetition_penalty=1.0,
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k or 0,
        min_p=0.0,
        max_completion_length=o.max_completion_length,
        logprobs=0,  # the sampled token's log-prob only
        generation_kwargs={"stop_token_ids": sorted(eos_token_ids)},
    )


class VLLMRollouts:
    """A `RolloutBackend` over a VLLMGeneration-like engine (`generate`, `sync_weights`).

    sleep_mode: colocate with `vllm_enable_sleep_mode`. VLLMGeneration puts the engine to sleep at level 2 after
    each generate (the weights are dropped), and its `generate` wakes it and reloads the checkpoint from disk
    (`collective_rpc("reload_weights")`, TRL's work-around for vLLM issue 29341) after any push made before the
    call: pushed weights would never be sampled. So the push happens inside generate, right before vLLM samples
    (`PushBeforeSampling` on the engine's `llm`): after each reload, and after each optimizer step. The pushed
    weights are still the weights after the last optimizer step.
    """

    def __init__(self, engine, sleep_mode: bool = False):
        self.engine = engine
        self.sleep_mode = sleep_mode
        self.synced_step: int | None = None
        if sleep_mode:
            engine.llm = PushBeforeSampling(engine.llm, engine.sync_weights)

    def sync_weights(self, step: int) -> None:
        """Push the trainer's weights when the optimizer has stepped since the last push (or never pushed)."""
        if step == self.synced_step:
            return
        if self.sleep_mode:
            self.engine.llm.stale = True  # pushed inside generate, after the engine's wake-up and reload
        else:
            self.engine.sync_weights()
        self.synced_step = step

    @torch.no_grad()
    def __call__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options: SamplingOptions,
                 eos_token_ids: list[int], pad_token_id: int) -> Rollouts:
        engine = self.engine
        engine.temperature, engine.top_p, engine.top_k = options.temperature, options.top_p, options.top_k or 0
        engine.max_completion_length = options.max_new_tokens
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        # Server mode takes every num_generations-th prompt and asks for n = num_generations of each.
        repeated = [prompt for prompt in prompts for _ in range(options.num_generations)]
        _, completion_ids, logprobs, logprob_token_ids = engine.generate(repeated, None, options.num_generations)
        if logprobs is not None:
            logprobs = sampled_token_logprobs(completion_ids, logprobs, logprob_token_ids)
        return rollouts_from_token_lists(completion_ids, logprobs, options.num_generations, eos_token_ids,
                                         pad_token_id, device=prompt_ids.device)


class PushBeforeSampling:
    """The colocated vLLM `LLM` of a sleeping engine, with the student's weights pushed right before it samples.

    Everything is passed through to the engine's `LLM`, except: `collective_rpc("reload_weights")` (the
    checkpoint from disk replaces the pushed weights) marks the weights stale, and `generate` first pushes the
    student's weights (`push`: VLLMGeneration.sync_weights) when they are stale. With TRL 1.9 that is one push
    per rollout batch (every generate reloads); with a TRL that stops reloading, one push per optimizer step.
    """

    def __init__(self, llm, push):
        self.llm, self.push, self.stale = llm, push, True

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def collective_rpc(self, method, *args, **kwargs):
        try:
            return self.llm.collective_rpc(method, *args, **kwargs)
        finally:
            if method == "reload_weights":
                self.stale = True

    def generate(self, *args, **kwargs):
        if self.stale:
            self.push()  # VLLMGeneration.sync_weights: wakes the weights (idempotent), loads the student's, resets the cache
            self.stale = False
        return self.llm.generate(*args, **kwargs)


def sampled_token_logprobs(completion_ids: list[list[int]], logprobs: list[list[list[float | None]]],
                           logprob_token_ids: list[list[list[int]]] | None) -> list[list[float | None]]:
    """Per completion, the log-prob of each sampled token from the engine's [sequence][position][rank] lists.

    With `logprobs=0` each position holds the sampled token alone; with top-N log-probs the entries are sorted by
    rank and the sampled token is found by id (None when the engine did not list it).
    """
    picked = []
    for row, (tokens, values) in enumerate(zip(completion_ids, logprobs)):
        ids = logprob_token_ids[row] if logprob_token_ids is not None else None
        row_values = []
        for position, (token, entries) in enumerate(zip(tokens, values)):
            if ids is None:
                row_values.append(entries[0] if entries else None)
                continue
            ranked = list(ids[position])
            row_values.append(entries[ranked.index(token)] if token in ranked else None)
        picked.append(row_values)
    return picked


def make_vllm_rollouts(trainer) -> VLLMRollouts:
    """The vLLM backend of a SelfDistillationTrainer (refuses setups it cannot serve, before any step)."""
    o, accelerator = trainer.options, trainer.accelerator
    if o.vllm_mode == "server" and accelerator.num_processes > 1 and getattr(o, "lambda_on_policy", 1.0) < 1.0:
        # A server call is collective over the processes; a micro-batch without on-policy rows would not join it.
        raise ValueError("use_vllm with vllm_mode: server and several processes needs lambda_on_policy: 1.0")
    engine_class = vllm_generation_class()
    engine = engine_class(
        model=trainer.model, accelerator=accelerator, processing_class=trainer.processing_class,
        # max_num_seqs only caps how many rollouts run at once (an eval batch may be larger: it queues).
        **vllm_generation_kwargs(o, per_device_batch_size=trainer.args.per_device_train_batch_size,
                                 eos_token_ids=trainer.eos_token_ids),
    )
    return VLLMRollouts(engine, sleep_mode=o.vllm_mode == "colocate" and o.vllm_enable_sleep_mode)
