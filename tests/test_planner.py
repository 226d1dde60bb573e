"""The memory planner: shapes and parameter counts, per-layer saved tensors, measured step memory, example configs.

The measured-memory test trains a tiny Qwen3 with SDFTTrainer for one step in a subprocess at three sequence
lengths and compares the planner's `step_bytes` with the step's peak RSS growth (within 25%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_configs"
CONFIG_1X80 = EXAMPLES / "sdft-qwen3.5-9b-64k-1x80gb.yml"
CONFIG_2X24 = EXAMPLES / "sdft-qwen3.5-9b-32k-2x24gb.yml"

# Tiny fp32 Qwen3 used for the measured-memory check (big enough that activations dominate the RSS growth).
CALIBRATION_MODEL = dict(hidden_size=256, num_layers=4, intermediate_size=768, vocab_size=32768)
CALIBRATION_PROMPTS = (1024, 2048, 4096)
CALIBRATION_COMPLETION = 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_yaml(prompt_tokens: int, completion_tokens: int = CALIBRATION_COMPLETION, checkpointing: bool = False) -> dict:
    """The calibration run as an Axolotl-style config dict (what the planner reads)."""
    from sd_plugin.testing import tiny_config

    config = tiny_config("qwen3", CALIBRATION_MODEL["vocab_size"], hidden_size=CALIBRATION_MODEL["hidden_size"],
                         num_layers=CALIBRATION_MODEL["num_layers"],
                         intermediate_size=CALIBRATION_MODEL["intermediate_size"])
    return {
        "base_model": "tiny-random-qwen3",
        "model_config": config.to_dict(),
        "device": "cpu",
        "fp32": True,
        "bf16": False,
        "adapter": "lora",
        "lora_r": 16,
        "lora_target_modules": LORA_TARGETS,
        "gradient_checkpointing": checkpointing,
        "sdp_attention": True,
        "micro_batch_size": 1,
        "optimizer": "adamw_torch",
        "trainer_type": "sdft",
        "sdft": {
            "max_prompt_length": prompt_tokens,
            "max_teacher_prompt_length": prompt_tokens + 64,
            "max_completion_length": completion_tokens,
            "loss_chunk_size": 64,
            "distillation_mode": "full_logits",
            "teacher_model_kind": "base",
        },
    }


# ------------------------------------------------------------------------------------------ measurement
def measure_step(prompt_tokens: int, completion_tokens: int, checkpointing: bool = False) -> dict:
    """Runs in a subprocess: one SDFTTrainer step; returns the peak RSS growth over the RSS before training."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin.testing import tiny_config
    from sd_plugin.trainers.sdft import SDFTConfig, SDFTTrainer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "example_configs" / "assets" / "tiny-qwen3")
    config = tiny_config("qwen3", CALIBRATION_MODEL["vocab_size"], hidden_size=CALIBRATION_MODEL["hidden_size"],
                         num_layers=CALIBRATION_MODEL["num_layers"],
                         intermediate_size=CALIBRATION_MODEL["intermediate_size"])
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.min_new_tokens = completion_tokens  # exactly `completion_tokens` new tokens
    model.generation_config.top_k = 0
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, len(tokenizer), (prompt_tokens,), generator=generator).tolist()
    demonstration = torch.randint(3, len(tokenizer), (64,), generator=generator).tolist()
    rows = [{"input_ids": prompt, "teacher_input_ids": prompt + demonstration, "demonstration_ids": demonstration}]
    args = SDFTConfig(output_dir=os.environ.get("TMPDIR", "/tmp") + "/planner_calibration", max_steps=1,
                      per_device_train_batch_size=1, report_to="none", save_strategy="no", use_cpu=True,
                      max_prompt_length=prompt_tokens, max_teacher_prompt_length=prompt_tokens + 64,
                      max_completion_length=completion_tokens, loss_chunk_size=64, distillation_alpha=1.0,
                      logging_steps=1, disable_tqdm=True, gradient_checkpointing=checkpointing)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=lora)
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak-RSS counter to the current RSS
        handle.write("5")
    with open("/proc/self/statm") as handle:
        rss_before = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    trainer.train()
    # VmHWM, not ru_maxrss: exec() seeds ru_maxrss with the (large) pytest parent's RSS.
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    return {"prompt_tokens": prompt_tokens, "rss_before": rss_before, "peak": peak, "delta": peak - rss_before}


def run_measurements(prompt_lengths, completion_tokens: int = CALIBRATION_COMPLETION,
                     checkpointing: bool = False) -> list[dict]:
    """One subprocess per length, all at once (one thread each): peak RSS is per process (VmHWM)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A fixed mmap threshold makes RSS track live tensors (glibc would otherwise keep freed 1-32 MiB blocks).
    processes = [subprocess.Popen([sys.executable, __file__, "--measure", str(p), str(completion_tokens),
                                   str(int(checkpointing))],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for p in prompt_lengths]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        lines = [line for line in stdout.splitlines() if line.startswith("MEASURED ")]
        if not lines:
            raise RuntimeError(f"measurement failed:\n{stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("MEASURED "):]))
    return results


# ------------------------------------------------------------------------------------------ tests
def test_parameter_counts_match_transformers_and_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sd_plugin.planner import ModelShape, count_parameters, linear_modules, lora_parameters
    from sd_plugin.testing import tiny_config

    for kind, overrides in [("qwen3", dict(num_layers=2)), ("qwen3_5", dict(num_layers=4)),
                            ("qwen3", dict(num_layers=2, tie_word_embeddings=True))]:
        config = tiny_config(kind, 500, **overrides)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        shape = ModelShape.from_hf_config(config.to_dict())
        assert count_parameters(shape) == sum(p.numel() for p in model.parameters()), kind
        targets = [name for name, *_ in linear_modules(shape)]
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
        adapter = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert lora_parameters(shape, targets, 4) == adapter, kind


def test_known_shapes_and_local_config():
    from sd_plugin.planner import QWEN3_5_9B, count_parameters, resolve_shape

    assert resolve_shape({"base_model": "Qwen/Qwen3.5-9B"}) is QWEN3_5_9B
    assert resolve_shape({"base_model": "unsloth/Qwen3.5-9B"}) is QWEN3_5_9B
    assert QWEN3_5_9B.full_attention_layers == 8 and QWEN3_5_9B.linear_attention_layers == 24
    assert 8.8e9 < count_parameters(QWEN3_5_9B) < 9.1e9  # text trunk of the 9B model
    assert 8.0e9 < count_parameters(resolve_shape({"base_model": "Qwen/Qwen3-8B"})) < 8.4e9
    assert 3.9e9 < count_parameters(resolve_shape({"base_model": "Qwen/Qwen3-4B"})) < 4.1e9
    local = resolve_shape({"base_model": str(REPO / "example_configs" / "assets" / "tiny-qwen3_5")})
    assert local.linear_attention_layers > 0 and local.attn_output_gate
    with pytest.raises(ValueError, match="model_config"):
        resolve_shape({"base_model": "someone/unknown-model"})


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_5"])
def test_saved_tensors_per_layer_match_autograd(kind):
    """Bytes saved for backward by one full-attention decoder layer, counted with saved-tensor hooks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sd_plugin.planner import ModelShape, TrainingSetup, linear_modules, saved_bytes_per_token
    from sd_plugin.testing import tiny_config

    config = tiny_config(kind, 300, hidden_size=128, num_layers=2, intermediate_size=384)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    shape = ModelShape.from_hf_config(config.to_dict())
    targets = [name for name, *_ in linear_modules(shape) if name not in ("in_proj_a", "in_proj_b")]
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets)).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = model.base_model.model.model.layers
    full_layer = next(i for i, layer in enumerate(layers) if not hasattr(layer, "linear_attn"))
    state = {"inside": False, "seen": {}}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if state["inside"] and storage.data_ptr() not in parameters:
            state["seen"][storage.data_ptr()] = storage.nbytes()
        return tensor

    layers[full_layer].register_forward_pre_hook(lambda *a: state.__setitem__("inside", True))
    layers[full_layer].register_forward_hook(lambda *a: state.__setitem__("inside", False))
    tokens = 256
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 300, (1, tokens)), use_cache=False)
    measured = sum(state["seen"].values()) / tokens
    setup = TrainingSetup(shape=shape, weight_format="fp32", compute_bytes=4, adapter="lora", lora_r=8,
                          lora_targets=targets, lora_bytes=4, attention="sdpa")
    predicted = saved_bytes_per_token(setup, "full")
    # Rotary cos/sin are saved once for the whole model (counted in the first full-attention layer here).
    assert predicted == pytest.approx(measured, rel=0.03)


def test_example_configs_fit():
    from sd_plugin.planner import plan_memory

    one = plan_memory(str(CONFIG_1X80), gpu_memory="80GB")
    assert one.fits, one.summary()
    assert one.setup.weight_format == "nf4" and one.setup.prompt_length == 57344
    assert one.setup.completion_length == 8192
    two = plan_memory(str(CONFIG_2X24), gpus=2, gpu_memory="24GB")
    assert two.fits, two.summary()
    assert two.setup.context_parallel == 1 and two.setup.gpus == 2 and two.setup.prompt_length == 24576


def test_oversized_variant_does_not_fit_and_gets_suggestions():
    from sd_plugin.planner import load_config, plan_memory

    cfg = load_config(str(CONFIG_1X80))
    cfg.update(adapter="lora", load_in_4bit=False, gradient_checkpointing=False)
    result = plan_memory(cfg, gpu_memory="80GB")
    assert not result.fits
    assert result.suggestions and any("gradient_checkpointing" in s for s in result.suggestions)
    # The 24 GB recipe at the 80 GB card's 57,344-token prompts does not fit; shorter prompts are suggested.
    cfg = load_config(str(CONFIG_2X24))
    cfg["sdft"].update(max_prompt_length=57344, max_teacher_prompt_length=57344)
    single = plan_memory(cfg, gpu_memory="24GB")
    assert not single.fits and any("max_prompt_length" in s for s in single.suggestions)
    assert not any("context_parallel" in s for s in single.suggestions)


def test_cli_plan_exit_code_and_output(capsys):
    from sd_plugin.cli import main

    assert main(["plan", str(CONFIG_1X80), "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "loss_chunks" in out
    assert main(["plan", str(CONFIG_1X80), "--gpu-mem", "16GB"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", str(CONFIG_2X24), "--gpus", "2", "--gpu-mem", "24GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["peak"] <= data["gpu_memory"]


def test_context_parallel_splits_sequence_terms():
    from sd_plugin.planner import load_config, plan_memory

    cfg = load_config(str(CONFIG_2X24))
    cfg["context_parallel_size"] = 1
    cfg.pop("context_parallel", None)
    one = plan_memory(cfg, gpu_memory="80GB")
    cfg["context_parallel_size"] = 2
    two = plan_memory(cfg, gpu_memory="80GB")
    assert two.backward_working_set == pytest.approx(one.backward_working_set / 2, rel=0.01)
    assert two.rollout_kv_cache == one.rollout_kv_cache  # each rank generates over the whole prompt
    assert two.weights == one.weights


def test_prediction_within_25_percent_of_measured_step_memory():
    """Three lengths of a tiny fp32 Qwen3 LoRA SDFT step on CPU: planner vs peak RSS growth (~40 s)."""
    from sd_plugin.planner import plan_memory

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    report = []
    for measured in run_measurements(CALIBRATION_PROMPTS):
        prompt_tokens = measured["prompt_tokens"]
        predicted = plan_memory(tiny_yaml(prompt_tokens), gpu_memory="64GB").step_bytes
        report.append((prompt_tokens, measured["delta"], predicted))
    text = "; ".join(f"prompt {p}: measured {m / 2**20:.0f} MiB, predicted {q / 2**20:.0f} MiB" for p, m, q in report)
    for _, measured_bytes, predicted_bytes in report:
        assert abs(predicted_bytes - measured_bytes) <= 0.25 * measured_bytes, text


@pytest.mark.slow
def test_prediction_with_gradient_checkpointing_within_25_percent():
    """The checkpointed path (what the 64K configs use): layer inputs saved, one layer recomputed in backward."""
    from sd_plugin.planner import plan_memory

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    report = []
    for measured in run_measurements((2048, 4096, 8192), checkpointing=True):
        prompt_tokens = measured["prompt_tokens"]
        predicted = plan_memory(tiny_yaml(prompt_tokens, checkpointing=True), gpu_memory="64GB").step_bytes
        report.append((prompt_tokens, measured["delta"], predicted))
    text = "; ".join(f"prompt {p}: measured {m / 2**20:.0f} MiB, predicted {q / 2**20:.0f} MiB" for p, m, q in report)
    for _, measured_bytes, predicted_bytes in report:
        assert abs(predicted_bytes - measured_bytes) <= 0.25 * measured_bytes, text


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--measure":
    result = measure_step(int(sys.argv[2]), int(sys.argv[3]), checkpointing=sys.argv[4] == "1")
    print("MEASURED " + json.dumps(result), flush=True)


def test_low_rank_ema_teacher_state_is_rank_times_layer_widths():
    from sd_plugin.planner import load_config, plan_memory

    cfg = load_config(str(EXAMPLES / "sdpo-qwen3-8b-chemistry.yml"))
    low = plan_memory(cfg, gpu_memory="80GB")
    cfg["sdpo"]["teacher_ema_rank"] = 0
    dense = plan_memory(cfg, gpu_memory="80GB")
    # Qwen3-8B: 36 layers x (q, k, v, o, gate, up, down); rank 256 + lora_r 64 factors vs dense [out, in], fp32.
    widths = 36 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 12288) * 3)
    areas = 36 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 4096 * 12288 * 3)
    assert low.teacher_state == (256 + 64) * widths * 4
    assert dense.teacher_state == areas * 4
    assert dense.peak > 60 * 2**30 > low.peak  # so on a 60 GB budget it is the change that fits
    assert any(s.startswith("teacher_ema_rank: 256") for s in plan_memory(cfg, gpu_memory="60GB").suggestions)


@pytest.mark.parametrize("trainer_type,block,expected", [
    ("sdpo", {}, dict(num_generations=8, completion_length=256, teacher="ema")),
    ("sdzero", {"phase": "distill"}, dict(num_generations=1, completion_length=4096, teacher="base")),
    ("sdzero", {"phase": "srt"}, dict(teacher="live")),
    ("sdft", {}, dict(num_generations=1, completion_length=256, teacher="base")),
    ("sdpo", {"num_generations": 4, "teacher_model_kind": "base"}, dict(num_generations=4, teacher="base")),
])
def test_plan_reads_each_methods_own_defaults(trainer_type, block, expected):
    from sd_plugin.planner import load_config, setup_from_config

    cfg = load_config(str(CONFIG_1X80))
    cfg.pop("sdft", None)
    cfg.update(trainer_type=trainer_type, sequence_len=16384, **{trainer_type: block})
    setup = setup_from_config(cfg)
    for key, value in expected.items():
        assert getattr(setup, key) == value, key


def test_chunked_prefill_plans_one_chunks_working_set_and_the_same_cache():
    from sd_plugin.planner import load_config, plan_memory

    cfg = load_config(str(EXAMPLES / "sdft-qwen3.5-9b-64k-2x24gb.yml"))
    chunked = plan_memory(cfg, gpus=2, gpu_memory="24GB")
    assert chunked.setup.prefill_chunk_size == 4096 and chunked.fits
    cfg["sdft"].pop("prefill_chunk_size")
    one_pass = plan_memory(cfg, gpus=2, gpu_memory="24GB")
    # The one-pass prefill's rollout phase is the larger; at 64K on 24 GB the step's backward (with the tiled
    # attention's repeated K/V heads and their gradients) now peaks slightly above both.
    assert chunked.phases["rollout"] < one_pass.phases["rollout"] and chunked.peak_phase == "backward"
    assert chunked.peak <= one_pass.peak
    assert chunked.rollout_kv_cache == one_pass.rollout_kv_cache  # the cache still holds the whole prompt
    # One 4,096-token chunk of the 57,344-token prompt: 1/14 of the working set, plus the cache's copy of one of the
    # 8 full-attention layers' keys/values while a chunk is appended.
    one_chunk = one_pass.rollout_working_set / 14
    assert one_chunk < chunked.rollout_working_set < one_chunk + chunked.rollout_kv_cache / 8
    assert any("prefill_chunk_size 4096" in note for note in chunked.notes)
    # Suggested when the one-pass prefill is what does not fit: 150K-token prompts on 31 GB GPUs (the tiled step's
    # backward then fits, the one-pass prefill does not).
    cfg["sdft"].update(max_prompt_length=150000, max_teacher_prompt_length=150000)
    cfg["sequence_len"] = 158192
    long_prompt = plan_memory(cfg, gpus=2, gpu_memory="31GB")
    assert long_prompt.peak_phase == "rollout" and not long_prompt.fits
    assert any(s.startswith("prefill_chunk_size: 4096") for s in long_prompt.suggestions), long_prompt.suggestions
