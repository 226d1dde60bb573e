"""Sequence tiling (sd_plugin/tiling.py): tiled forwards and gradients equal the untiled model's."""

import pytest
import torch

from sd_plugin.testing import build_model
from sd_plugin.tiling import tiled_decoder
from sd_plugin.trainers.base import completion_hidden_states

PROMPT, COMPLETION = 21, 11


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiles are many tiny matmuls: on a loaded 2-core machine two threads are ~100x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual, expected, tol, name=""):
    """Max abs difference within tol x the tensor's largest magnitude (gradients span 1e-2 to 1e2)."""
    scale = max(expected.abs().max().item(), 1.0)
    difference = (actual - expected).abs().max().item()
    assert difference <= tol * scale, f"{name}: max |diff| {difference:.3g} > {tol:g} x {scale:.3g}"


def batch(vocab: int, *, pad: int = 0, seed: int = 1):
    """Two rows: the second left-padded by `pad` tokens (as the trainers pad prompts)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(10, vocab, (2, PROMPT), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :pad] = 0
    prompt_ids[1, :pad] = 0
    completion_ids = torch.randint(10, vocab, (2, COMPLETION), generator=g)
    return prompt_ids, prompt_mask, completion_ids, torch.ones_like(completion_ids)


def model_of(kind, tokenizer, dtype, **overrides):
    model = build_model(kind, tokenizer, num_layers=4, **overrides).to(dtype)
    model.config._attn_implementation = "sdpa"  # eager attention's softmax runs in fp32: no fp64 reference
    return model


def tolerance(dtype):
    # fp64: the models' RMSNorm still upcasts to fp32 (the gradient through it is rounded to fp32), so tiled
    # and untiled agree to fp32 rounding summed in another order. fp32: transformers' chunked delta rule
    # takes differences of cumulative log-decays that tiles restart, ~1e-4 relative on dt_bias / A_log.
    return 1e-6 if dtype == torch.float64 else 5e-4


def delta_rule_in_input_dtype(query, key, value, g, beta, initial_state=None, output_final_state=False,
                              use_qk_l2norm_in_kernel=False, **kwargs):
    """The gated delta rule token by token in the inputs' dtype (transformers' torch version computes in fp32)."""
    if use_qk_l2norm_in_kernel:
        query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6)
        key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
    query, key, value, beta, g = (x.transpose(1, 2) for x in (query, key, value, beta, g.to(query.dtype)))
    batch, heads, length, key_dim = key.shape
    query = query * key_dim**-0.5
    state = initial_state if initial_state is not None else query.new_zeros(batch, heads, key_dim, value.shape[-1])
    outputs = []
    for t in range(length):
        state = state * g[:, :, t].exp()[..., None, None]
        delta = (value[:, :, t] - (state * key[:, :, t, :, None]).sum(-2)) * beta[:, :, t, None]
        state = state + key[:, :, t, :, None] * delta[:, :, None, :]
        outputs.append((state * query[:, :, t, :, None]).sum(-2))
    return torch.stack(outputs, dim=1), (state if output_final_state else None)


@pytest.fixture
def exact_delta_rule(monkeypatch):
    """fp64 runs use an fp64 delta rule, so a tiling error cannot hide under fp32 rounding."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", delta_rule_in_input_dtype)


def hidden_and_grads(model, inputs, tile_size):
    model.zero_grad()
    hidden = completion_hidden_states(model, model, *inputs, sequence_tile_size=tile_size)
    weights = torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).view_as(hidden)
    (hidden * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), grads


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_5"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tile_size,pad", [(5, 0), (8, 7), (64, 3)])
def test_tiled_outputs_and_gradients_equal_untiled(tokenizer, kind, dtype, tile_size, pad, request):
    """Tile borders inside the prompt and the completion (state + conv carry), left padding, one big tile."""
    if dtype == torch.float64:
        request.getfixturevalue("exact_delta_rule")
    tol = tolerance(dtype)
    model = model_of(kind, tokenizer, dtype)
    inputs = batch(model.config.vocab_size, pad=pad)
    reference, reference_grads = hidden_and_grads(model, inputs, 0)
    tiled, tiled_grads = hidden_and_grads(model, inputs, tile_size)
    assert_close(tiled, reference, tol)
    assert reference_grads.keys() == tiled_grads.keys()
    for name, grad in reference_grads.items():
        assert_close(tiled_grads[name], grad, tol, name)


def test_tile_shorter_than_conv_kernel_carries_the_convolution(tokenizer, exact_delta_rule):
    """Tiles of 1-2 tokens: the conv tail spans several earlier tiles (kernel 4 needs 3 columns)."""
    model = model_of("qwen3_5", tokenizer, torch.float64)
    inputs = batch(model.config.vocab_size, pad=2)
    reference, reference_grads = hidden_and_grads(model, inputs, 0)
    for tile_size in (1, 2):
        tiled, tiled_grads = hidden_and_grads(model, inputs, tile_size)
        assert_close(tiled, reference, 1e-6)
        for name, grad in reference_grads.items():
            assert_close(tiled_grads[name], grad, 1e-6, name)


def test_dropping_the_state_carry_breaks_equality(tokenizer, exact_delta_rule, monkeypatch):
    """The carry matters: tiles that restart the delta rule from zero state give different outputs."""
    import sd_plugin.tiling as tiling

    model = model_of("qwen3_5", tokenizer, torch.float64)
    inputs = batch(model.config.vocab_size)
    with torch.no_grad():
        reference = completion_hidden_states(model, model, *inputs)
        original = tiling.delta_net_tile
        monkeypatch.setattr(tiling, "delta_net_tile",
                            lambda layer, h, m, tail, state: original(layer, h, m, torch.zeros_like(tail), None))
        broken = completion_hidden_states(model, model, *inputs, sequence_tile_size=8)
    assert not torch.allclose(broken, reference, atol=1e-3)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_5"])
def test_chunked_teacher_equals_full_teacher_at_completion_positions(tokenizer, kind):
    """No grad (the teacher): the tiled forward is a chunked prefill returning a copy of the completion slice."""
    model = model_of(kind, tokenizer, torch.float32)
    inputs = batch(model.config.vocab_size, pad=5)
    with torch.no_grad():
        full = completion_hidden_states(model, model, *inputs)
        chunked = completion_hidden_states(model, model, *inputs, sequence_tile_size=6)
    torch.testing.assert_close(chunked, full, rtol=2e-5, atol=2e-5)
    assert chunked.shape == (2, COMPLETION, model.config.hidden_size)
    # A copy: its storage is the completion slice, not a [B, T, H] buffer.
    assert chunked.untyped_storage().nbytes() == chunked.numel() * chunked.element_size()


def test_offloaded_layer_inputs_give_the_same_gradients(tokenizer, exact_delta_rule):
    model = model_of("qwen3_5", tokenizer, torch.float64)
    inputs = batch(model.config.vocab_size, pad=4)
    reference, reference_grads = hidden_and_grads(model, inputs, 0)
    model.zero_grad()
    hidden = completion_hidden_states(model, model, *inputs, sequence_tile_size=7, sequence_tile_offload=True)
    (hidden * torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).view_as(hidden)).sum().backward()
    assert_close(hidden.detach(), reference, 1e-6)
    for name, grad in reference_grads.items():
        assert_close(dict(model.named_parameters())[name].grad, grad, 1e-6, name)


def test_lora_student_tiled_gradients_equal_untiled(tokenizer, exact_delta_rule):
    """peft LoRA wraps the projections the tiles call: the adapter's gradients match too."""
    from peft import LoraConfig, get_peft_model

    model = model_of("qwen3_5", tokenizer, torch.float64)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    inputs = batch(model.config.vocab_size, pad=3)
    reference, reference_grads = hidden_and_grads(model, inputs, 0)
    tiled, tiled_grads = hidden_and_grads(model, inputs, 6)
    assert_close(tiled, reference, 1e-6)
    assert any("lora_A" in name for name in tiled_grads)
    for name, grad in reference_grads.items():
        assert_close(tiled_grads[name], grad, 1e-6, name)


def test_unsupported_decoder_is_refused_naming_the_key():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="sequence_tile_size.*LlamaModel"):
        with tiled_decoder(model.get_decoder(), 4, keep=slice(0, 1)):
            pass


def test_sequence_tile_size_option_is_checked():
    from sd_plugin.trainers.base import SelfDistillationOptions

    with pytest.raises(ValueError, match="sequence_tile_size"):
        SelfDistillationOptions(sequence_tile_size=-1).check()
    with pytest.raises(ValueError, match="sequence_tile_offload"):
        SelfDistillationOptions(sequence_tile_offload=True).check()


@pytest.mark.slow
def test_sdft_step_with_tiling_equals_the_untiled_step(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    """Through the trainer: the teacher (no grad) and the student both run tiled; same loss and gradients."""
    from datasets import Dataset
    from peft import LoraConfig

    import sd_plugin.tiling as tiling
    from sd_plugin import SDFTConfig, SDFTTrainer
    from sd_plugin.rollout import Rollouts

    def fixed_sample(self, model, prompt_ids, prompt_mask):
        ids = torch.tensor([[30, 31, 32, 33, 34, 35, 36]] * prompt_ids.shape[0])
        return Rollouts(ids, torch.ones_like(ids), torch.arange(ids.shape[0]), torch.zeros(ids.shape[0], dtype=torch.bool))

    monkeypatch.setattr(SDFTTrainer, "sample", fixed_sample)
    grad_modes = []
    real = tiling.tiled_hidden_states
    monkeypatch.setattr(tiling, "tiled_hidden_states", lambda *a, **k: grad_modes.append(torch.is_grad_enabled()) or real(*a, **k))
    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:2]])

    def step(tile_size):
        torch.manual_seed(0)
        args = SDFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                          save_strategy="no", use_cpu=True, seed=0, max_completion_length=7, sequence_tile_size=tile_size)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "in_proj_qkv", "out_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
        trainer = SDFTTrainer(model=build_model("qwen3_5", tokenizer), args=args, train_dataset=data,
                              processing_class=tokenizer, peft_config=lora)
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        loss = trainer.compute_loss(trainer.model, inputs)
        return loss.detach(), torch.autograd.grad(loss, [p for p in trainer.model.parameters() if p.requires_grad])

    reference, reference_grads = step(0)
    assert grad_modes == []
    tiled, tiled_grads = step(16)
    assert grad_modes == [False, True], "teacher (no grad) then student, both tiled"
    assert_close(tiled, reference, 5e-4)
    for a, b in zip(tiled_grads, reference_grads):
        assert_close(a, b, 5e-4)


def test_tiled_attention_calls_sdpa_with_equal_heads_and_no_gqa_flag(tokenizer, monkeypatch):
    """The call CUDA's memory-efficient kernel takes (it refuses grouped heads; flash refuses the mask): K/V heads
    repeated to the query heads, a boolean mask, no enable_gqa. On CPU SDPA's fused kernel took either call, so
    only the call's shape can be checked here (the kernel that runs on CUDA: the gpu test below)."""
    import sd_plugin.tiling as tiling

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.shape[1], key.shape[1], value.shape[1], attn_mask.dtype, kwargs.get("enable_gqa", False)))
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(tiling.F, "scaled_dot_product_attention", recording)
    model = model_of("qwen3", tokenizer, torch.float32)
    assert model.config.num_attention_heads > model.config.num_key_value_heads, "the test needs grouped heads"
    with torch.no_grad():
        completion_hidden_states(model, model, *batch(model.config.vocab_size, pad=3), sequence_tile_size=8)
    assert calls and all(q == k == v and mask == torch.bool and not gqa for q, k, v, mask, gqa in calls), calls


# ---------------------------------------------------------------------------------------------- the planner
def test_planner_tiled_student_memory_grows_with_the_tile_not_the_length():
    from dataclasses import replace

    from sd_plugin.planner import QWEN3_5_9B, TrainingSetup, plan

    def student(length, tile):
        setup = TrainingSetup(shape=QWEN3_5_9B, weight_format="nf4", adapter="qlora", lora_r=64,
                              gradient_checkpointing="offload", prompt_length=length - 256,
                              teacher_prompt_length=length - 256, completion_length=256,
                              sequence_tile_size=tile, sequence_tile_offload=True)
        result = plan(setup, suggest=False)
        return result.backward_working_set, result
    untiled_8k, untiled_64k = student(8192, 0)[0], student(65536, 0)[0]
    tiled_8k, tiled_64k = student(8192, 4096)[0], student(65536, 4096)[0]
    assert untiled_64k > 7 * untiled_8k  # one layer recomputed over the whole sequence
    assert tiled_64k < 0.3 * untiled_64k
    # What still grows with T under tiling: the [tile, T] mask and the [T, H] / K/V gradients of one layer.
    assert tiled_64k < 4 * tiled_8k
    _, result = student(65536, 4096)
    assert result.host_offloaded > 0 and any("sequence_tile_size" in note for note in result.notes)
    bigger_tile = plan(replace(result.setup, sequence_tile_size=8192), suggest=False)
    assert bigger_tile.backward_working_set > result.backward_working_set


def test_64k_two_24gb_config_fits_only_with_tiling():
    from pathlib import Path

    from sd_plugin.planner import load_config, plan_memory

    path = Path(__file__).resolve().parents[1] / "example_configs" / "sdft-qwen3.5-9b-64k-2x24gb.yml"
    cfg = load_config(str(path))
    tiled = plan_memory(cfg, gpus=2, gpu_memory="24GB")
    assert tiled.fits, tiled.summary()
    assert tiled.setup.sequence_tile_size == 4096 and tiled.setup.sequence_tile_offload
    assert tiled.setup.prompt_length + tiled.setup.completion_length == 65536
    cfg["sdft"].pop("sequence_tile_size")
    cfg["sdft"].pop("sequence_tile_offload")
    untiled = plan_memory(cfg, gpus=2, gpu_memory="24GB")
    assert not untiled.fits
    assert any(s.startswith("sequence_tile_size: 4096") for s in untiled.suggestions)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
def test_64k_step_of_a_qwen3_5_9b_shaped_model_against_the_planner(offload):
    """A 64K-token student forward + backward, tiles of 4,096, random bf16 Qwen3.5-9B-shaped weights + LoRA r16.

    Prints the measured peak (torch.cuda.max_memory_allocated over the step, minus what was allocated before it)
    next to the planner's student terms for the same setup.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    from sd_plugin.planner import QWEN3_5_9B, TrainingSetup, plan

    s = QWEN3_5_9B
    config = Qwen3_5TextConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, linear_num_key_heads=s.linear_num_key_heads,
        linear_num_value_heads=s.linear_num_value_heads, linear_key_head_dim=s.linear_key_head_dim,
        linear_value_head_dim=s.linear_value_head_dim, linear_conv_kernel_dim=s.linear_conv_kernel_dim,
        full_attention_interval=s.num_layers // s.full_attention_layers, max_position_embeddings=131072,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    targets = ["q_proj", "v_proj", "in_proj_qkv", "out_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    length, completion, tile = 65536, 256, 4096
    prompt_ids = torch.randint(10, s.vocab_size, (1, length - completion), device="cuda")
    completion_ids = torch.randint(10, s.vocab_size, (1, completion), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hidden = completion_hidden_states(model, model, prompt_ids, torch.ones_like(prompt_ids), completion_ids,
                                      torch.ones_like(completion_ids), sequence_tile_size=tile,
                                      sequence_tile_offload=offload)
    hidden.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    setup = TrainingSetup(shape=s, weight_format="bf16", adapter="lora", lora_r=16, lora_targets=targets,
                          gradient_checkpointing="full", attention="sdpa", prompt_length=length - completion,
                          teacher_prompt_length=length - completion, completion_length=completion,
                          sequence_tile_size=tile, sequence_tile_offload=offload)
    result = plan(setup, suggest=False)
    predicted = result.student_activations + result.backward_working_set + result.lora_grads + result.hidden_states
    print(f"64K tiled step (offload {offload}): measured {measured / 2**30:.2f} GiB, planner {predicted / 2**30:.2f} GiB")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert measured <= 1.3 * predicted + 2**30


@pytest.mark.gpu
@pytest.mark.slow
def test_tiled_64k_attention_layer_runs_the_memory_efficient_kernel_within_the_planner():
    """One Qwen3.5-9B-shaped full-attention layer (16 query / 4 K/V heads of 256, output gate) over 65,536
    tokens in tiles of 4,096, bf16, LoRA r16 on q/v: forward + backward. Asserts that SDPA ran its
    memory-efficient kernel and never the math kernel (the profiler's aten ops), and that the measured peak
    (torch.cuda.max_memory_allocated minus what was allocated before) is what the planner gives that layer."""
    from dataclasses import replace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    from sd_plugin.planner import QWEN3_5_9B, TrainingSetup, plan

    s = replace(QWEN3_5_9B, num_layers=1, full_attention_layers=1, vocab_size=1024)
    config = Qwen3_5TextConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size, num_hidden_layers=1,
        num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim,
        linear_num_key_heads=s.linear_num_key_heads, linear_num_value_heads=s.linear_num_value_heads,
        linear_key_head_dim=s.linear_key_head_dim, linear_value_head_dim=s.linear_value_head_dim,
        layer_types=["full_attention"], max_position_embeddings=131072, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    targets = ["q_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    length, completion, tile = 65536, 256, 4096
    prompt_ids = torch.randint(10, s.vocab_size, (1, length - completion), device="cuda")
    completion_ids = torch.randint(10, s.vocab_size, (1, completion), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        hidden = completion_hidden_states(model, model, prompt_ids, torch.ones_like(prompt_ids), completion_ids,
                                          torch.ones_like(completion_ids), sequence_tile_size=tile)
        hidden.float().pow(2).mean().backward()
        torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    ops = {event.key for event in profile.key_averages()}
    assert "aten::_scaled_dot_product_efficient_attention" in ops, sorted(o for o in ops if "attention" in o)
    assert "aten::_efficient_attention_backward" in ops or "aten::_scaled_dot_product_efficient_attention_backward" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
    setup = TrainingSetup(shape=s, weight_format="bf16", adapter="lora", lora_r=16, lora_targets=targets,
                          gradient_checkpointing="full", attention="sdpa", prompt_length=length - completion,
                          teacher_prompt_length=length - completion, completion_length=completion,
                          sequence_tile_size=tile)
    result = plan(setup, suggest=False)
    predicted = result.student_activations + result.backward_working_set + result.lora_grads + result.hidden_states
    print(f"one tiled 64K attention layer: measured {measured / 2**30:.2f} GiB, planner {predicted / 2**30:.2f} GiB")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    # The math kernel alone would hold [16, 4096, 65536] bf16 scores (8 GiB) and their softmax.
    assert 0.6 * predicted <= measured <= 1.25 * predicted + 2**28
