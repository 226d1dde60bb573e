"""The vLLM rollout backend without the engine: options, mapping onto TRL's VLLMGeneration, engine output ->
Rollouts, and when the weights are pushed. The engine itself runs only in the `gpu` tests at the end."""

import importlib.util
import inspect
import math
import time
import types

import pytest
import torch
from datasets import Dataset

from sd_plugin import SDFTConfig, SDFTTrainer
from sd_plugin.testing import build_model
from sd_plugin.trainers.sdft import SDFTOptions
from sd_plugin.vllm_rollout import VLLMRollouts, sampled_token_logprobs, vllm_generation_kwargs


@pytest.mark.parametrize("overrides,match", [
    (dict(vllm_mode="server"), "vllm_mode is set but use_vllm is false"),
    (dict(vllm_gpu_memory_utilization=0.5), "vllm_gpu_memory_utilization is set but use_vllm is false"),
    (dict(use_vllm=True, vllm_mode="remote"), "vllm_mode must be 'colocate' or 'server'"),
    (dict(use_vllm=True, vllm_gpu_memory_utilization=0.0), r"vllm_gpu_memory_utilization must be in \(0, 1\]"),
    (dict(use_vllm=True, vllm_gpu_memory_utilization=1.5), r"vllm_gpu_memory_utilization must be in \(0, 1\]"),
    (dict(use_vllm=True, vllm_tensor_parallel_size=0), "vllm_tensor_parallel_size must be >= 1"),
    (dict(use_vllm=True, vllm_model_impl="onnx"), "vllm_model_impl must be"),
    (dict(use_vllm=True, vllm_mode="server", vllm_server_port=70000), "vllm_server_port must be a port number"),
    (dict(use_vllm=True, vllm_mode="server", vllm_server_timeout=math.inf), "vllm_server_timeout must be"),
    (dict(use_vllm=True, vllm_max_model_length=1000), r"vllm_max_model_length \(1000\) is below"),
    (dict(use_vllm=True, vllm_server_port=9000), "vllm_server_port is only used with vllm_mode: server"),
    (dict(use_vllm=True, vllm_mode="server", vllm_enable_sleep_mode=True), "vllm_enable_sleep_mode is only used with vllm_mode: colocate"),
])
def test_bad_vllm_options_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        SDFTOptions(**overrides).check()


def test_use_vllm_is_accepted_in_the_yaml_block_and_bad_keys_are_not():
    from sd_plugin.axolotl.args import _validated_block

    block = _validated_block("sdft", {"use_vllm": True, "vllm_mode": "server", "vllm_server_port": 8001})
    assert block.use_vllm and block.vllm_server_port == 8001
    with pytest.raises(ValueError, match="sdft: vllm_mode is set but use_vllm is false"):
        _validated_block("sdft", {"vllm_mode": "server"})


def test_options_map_onto_trls_vllm_generation_and_sample_the_options_alone():
    from trl.generation.vllm_generation import VLLMGeneration

    options = SDFTOptions(use_vllm=True, max_prompt_length=1000, max_completion_length=200, num_generations=4,
                          temperature=0.7, top_p=0.9, top_k=None, vllm_gpu_memory_utilization=0.4,
                          vllm_enable_sleep_mode=True)
    kwargs = vllm_generation_kwargs(options, per_device_batch_size=8, eos_token_ids=[9, 3])  # completions: 2 prompts x 4
    accepted = set(inspect.signature(VLLMGeneration.__init__).parameters) - {"self", "model", "accelerator", "processing_class"}
    assert set(kwargs) <= accepted, set(kwargs) - accepted
    assert kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9 and kwargs["top_k"] == 0
    assert kwargs["repetition_penalty"] == 1.0 and kwargs["min_p"] == 0.0  # nothing but the options shapes sampling
    assert kwargs["max_completion_length"] == 200 and kwargs["max_model_length"] == 1200
    assert kwargs["max_num_seqs"] == 8 and kwargs["logprobs"] == 0
    assert kwargs["gpu_memory_utilization"] == 0.4 and kwargs["enable_sleep_mode"] is True and kwargs["mode"] == "colocate"
    assert kwargs["generation_kwargs"] == {"stop_token_ids": [3, 9]}


def fake_request_outputs(sequences):
    """vLLM RequestOutput look-alikes: per sequence, (token ids, [{token: logprob, rank}] per position)."""
    outputs = []
    for tokens, ranked in sequences:
        entries = [{token: types.SimpleNamespace(logprob=lp, rank=rank) for token, (lp, rank) in pos.items()} for pos in ranked]
        outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens, logprobs=entries)]))
    return outputs


def test_engine_log_probs_of_the_sampled_tokens_reach_the_rollouts():
    from trl.generation.vllm_generation import extract_logprobs

    # Top-2 log-probs: the sampled token is not always rank 1 (position 1 of the first sequence).
    sequences = [
        ([5, 6, 9, 4], [{5: (-0.1, 1), 8: (-2.0, 2)}, {7: (-0.2, 1), 6: (-1.9, 2)}, {9: (-0.3, 1)}, {4: (-0.4, 1)}]),
        ([2, 2], [{2: (-0.5, 1)}, {2: (float("nan"), 1)}]),
    ]
    logprobs, token_ids = extract_logprobs(fake_request_outputs(sequences))
    completions = [s[0] for s in sequences]
    picked = sampled_token_logprobs(completions, logprobs, token_ids)
    assert picked == [[-0.1, -1.9, -0.3, -0.4], [-0.5, None]]

    class Engine:
        def generate(self, prompts, images, num_generations):
            self.prompts = prompts
            return prompts, completions, logprobs, token_ids

    engine = Engine()
    prompt_ids = torch.tensor([[0, 0, 11, 12], [13, 14, 15, 16]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    from sd_plugin.rollout import SamplingOptions

    rollouts = VLLMRollouts(engine)(None, prompt_ids[:1], prompt_mask[:1], SamplingOptions(max_new_tokens=4, num_generations=2),
                                    [9], 0)
    assert engine.prompts == [[11, 12], [11, 12]]  # padding stripped, each prompt num_generations times
    assert rollouts.completion_ids.tolist() == [[5, 6, 9], [2, 2, 0]]
    assert rollouts.completion_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert rollouts.truncated.tolist() == [False, True]
    assert rollouts.prompt_index.tolist() == [0, 0]
    torch.testing.assert_close(rollouts.old_logprobs, torch.tensor([[-0.1, -1.9, -0.3], [-0.5, 0.0, 0.0]]))


class RecordingEngine:
    """Stands in for VLLMGeneration: records weight pushes and generate calls with a fingerprint of the weights."""

    def __init__(self, model, accelerator, processing_class, **kwargs):
        self.model, self.kwargs, self.events = model, kwargs, []
        RecordingEngine.last = self

    def fingerprint(self):
        return tuple(round(p.detach().double().sum().item(), 10) for p in self.model.parameters() if p.requires_grad)

    def sync_weights(self):
        self.events.append(("sync", self.fingerprint()))

    def generate(self, prompts, images, num_generations):
        self.events.append(("generate", self.fingerprint()))
        eos = self.kwargs["generation_kwargs"]["stop_token_ids"][0]
        completions = [[40 + i, 41, 42, eos] for i in range(len(prompts))]
        return prompts, completions, [[[-1.0]] * 4 for _ in prompts], None


def test_weights_reach_vllm_once_per_optimizer_step_before_its_rollouts(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    from transformers import TrainerCallback

    import sd_plugin.vllm_rollout as vllm_rollout

    monkeypatch.setattr(vllm_rollout, "vllm_generation_class", lambda: RecordingEngine)

    class StepRecorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            RecordingEngine.last.events.append(("optimizer_step", state.global_step))

    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:6]])
    args = SDFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                      max_steps=3, logging_steps=1, max_completion_length=8, report_to="none", save_strategy="no",
                      learning_rate=1e-2, use_cpu=True, seed=0, use_vllm=True)
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                          callbacks=[StepRecorder()])
    engine = RecordingEngine.last
    assert engine.kwargs["mode"] == "colocate" and engine.kwargs["max_num_seqs"] == 1
    trainer.train()
    kinds = [kind for kind, _ in engine.events]
    assert kinds == ["sync", "generate", "generate", "optimizer_step"] * 3
    pushed = [value for kind, value in engine.events if kind == "sync"]
    assert len(set(pushed)) == 3  # each push carries the weights the last optimizer step made
    last_push = None
    for kind, value in engine.events:
        if kind == "sync":
            last_push = value
        elif kind == "generate":
            assert value == last_push  # rollouts of step k come from the weights after step k - 1
    # vLLM's sampling log-probs become old_logprobs: the importance weight is on and logged by default.
    assert all("importance_weight_mean" in entry for entry in trainer.state.log_history[:-1])


class SleepingLLM:
    """Stands in for vLLM's `LLM` under TRL's real VLLMGeneration (`_init_vllm`, `sync_weights`, `generate`): it
    keeps its own copy of the weights and where they came from. Level-2 sleep drops them; waking up gives
    garbage until a reload (`collective_rpc("reload_weights")`: the checkpoint from disk) or a push
    (`load_weights`, only into awake memory). `generate` records, per call, where its weights came from and
    whether they equal the student's weights at that moment."""

    def __init__(self, model, enable_sleep_mode, student, **kwargs):
        self.student, self.enable_sleep_mode, self.calls = student, enable_sleep_mode, []
        SleepingLLM.last = self
        self.disk = {name: p.detach().clone() for name, p in student.named_parameters()}
        self.weights, self.source, self.awake = dict(self.disk), "disk", True
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))

    def sleep(self, level):
        assert self.enable_sleep_mode
        self.awake = False
        if level == 2:
            self.weights, self.source = {}, "dropped"

    def wake_up(self, tags=None):
        if not self.awake and "weights" in (tags or ["weights"]):
            self.awake = True
            if self.source == "dropped":
                self.weights = {name: torch.full_like(p, float("nan")) for name, p in self.disk.items()}
                self.source = "garbage"

    def collective_rpc(self, method, *args, **kwargs):
        assert method == "reload_weights"
        self.weights, self.source = {name: p.clone() for name, p in self.disk.items()}, "disk"

    def load_weights(self, named):
        assert self.awake, "load_weights into sleeping (unmapped) memory"
        for name, param in named:
            self.weights[name] = param.detach().clone()
        self.source = "pushed"

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, sampling_params, use_tqdm=False):
        student = dict(self.student.named_parameters())
        same = bool(self.weights) and all(torch.equal(self.weights[n], student[n].detach()) for n in student)
        self.calls.append((self.source, same))
        eos = sampling_params.stop_token_ids[0]
        outputs = []
        for i, prompt in enumerate(prompts):
            tokens = [40 + i % 5, 41, 42, 43, 44, 45, eos]  # past num_loss_tokens_to_skip: the student moves
            logprobs = [{t: types.SimpleNamespace(logprob=-1.0, rank=1)} for t in tokens]
            outputs.append(types.SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[
                types.SimpleNamespace(token_ids=tokens, logprobs=logprobs)]))
        return outputs


def test_sleep_mode_samples_the_pushed_student_weights_step_after_step(tmp_path, tokenizer, quickstart_rows, monkeypatch):
    """vllm_enable_sleep_mode with TRL's own VLLMGeneration code (its generate wakes the engine and reloads the
    checkpoint from disk on every call): every rollout batch must be sampled from the student's current weights."""
    import os

    from trl.generation import vllm_generation

    import sd_plugin.vllm_rollout as vllm_rollout

    monkeypatch.setattr(os, "environ", os.environ.copy())  # TRL's _init_vllm writes RANK, WORLD_SIZE, ... there
    model = build_model("qwen3", tokenizer)
    monkeypatch.setattr(vllm_rollout, "vllm_generation_class", lambda: vllm_generation.VLLMGeneration)
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda: True)
    monkeypatch.setattr(vllm_generation, "LLM", lambda **kwargs: SleepingLLM(student=model, **kwargs), raising=False)
    monkeypatch.setattr(vllm_generation, "SamplingParams", types.SimpleNamespace, raising=False)
    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:6]])
    args = SDFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                      max_steps=3, logging_steps=1, max_completion_length=8, report_to="none", save_strategy="no",
                      learning_rate=1e-2, use_cpu=True, seed=0, use_vllm=True, vllm_enable_sleep_mode=True)
    trainer = SDFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    llm = SleepingLLM.last
    assert isinstance(llm, SleepingLLM) and llm.source == "dropped"  # TRL's _init_vllm put it to sleep
    trainer.train()
    # 3 optimizer steps x 2 micro-batches, each sampled from the student's weights of that moment, pushed by TRL's
    # sync_weights after TRL's reload; the student moved, so the checkpoint on disk is no longer it.
    assert llm.calls == [("pushed", True)] * 6
    assert any(not torch.equal(llm.disk[n], p.detach()) for n, p in model.named_parameters())


def test_server_mode_with_several_processes_refuses_mixed_batches(monkeypatch):
    import sd_plugin.vllm_rollout as vllm_rollout

    monkeypatch.setattr(vllm_rollout, "vllm_generation_class", lambda: RecordingEngine)
    trainer = types.SimpleNamespace(options=SDFTOptions(use_vllm=True, vllm_mode="server", lambda_on_policy=0.5),
                                    accelerator=types.SimpleNamespace(num_processes=2))
    with pytest.raises(ValueError, match="needs lambda_on_policy: 1.0"):
        vllm_rollout.make_vllm_rollouts(trainer)


def test_use_vllm_without_vllm_installed_fails_before_training(tmp_path, tokenizer, quickstart_rows):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:2]])
    args = SDFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, use_vllm=True)
    with pytest.raises(ValueError, match=r"use_vllm: true needs vLLM"):
        SDFTTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=data, processing_class=tokenizer)


# ------------------------------------------------------------------ with the engine (CUDA + vllm)
def vllm_trainer(tmp_path, tokenizer, quickstart_rows, **overrides):
    model = build_model("qwen3", tokenizer).to(torch.bfloat16)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                    max_completion_length=64, report_to="none", save_strategy="no", learning_rate=1e-4, seed=0, bf16=True)
    settings.update(overrides)
    data = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:12]])
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return SDFTTrainer(model=student, args=SDFTConfig(**settings), train_dataset=data, processing_class=tokenizer)


@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_colocate_trains_and_reports_importance_weights_near_one(tmp_path, tokenizer, quickstart_rows):
    pytest.importorskip("vllm")
    trainer = vllm_trainer(tmp_path, tokenizer, quickstart_rows, use_vllm=True, vllm_gpu_memory_utilization=0.2)
    start = time.perf_counter()
    trainer.train()
    vllm_seconds = time.perf_counter() - start
    logged = [entry for entry in trainer.state.log_history if "importance_weight_mean" in entry]
    assert len(logged) == 3
    # Same weights, same temperature: only kernel differences between vLLM and the trainer remain.
    assert all(abs(entry["importance_weight_mean"] - 1.0) < 0.05 for entry in logged)
    hf = vllm_trainer(tmp_path / "hf", tokenizer, quickstart_rows)
    start = time.perf_counter()
    hf.train()
    print(f"3 steps: vLLM colocate {vllm_seconds:.1f}s, HF generate {time.perf_counter() - start:.1f}s")


@pytest.mark.parametrize("overrides,active", [
    (dict(use_vllm=True), True),
    (dict(use_vllm=True, temperature=0.8), False),          # the weight would undo the recipe's temperature
    (dict(use_vllm=True, temperature=0.8, distillation_temperature=0.8), True),
    (dict(use_vllm=True, top_p=0.95), False),
    (dict(use_vllm=True, top_k=20), False),
    (dict(use_vllm=True, top_p=0.95, importance_sampling_correction=True), True),
    (dict(use_vllm=True, importance_sampling_correction=False), False),
    (dict(), False),
    (dict(importance_sampling_correction=True), True),
])
def test_importance_correction_by_default_only_where_it_corrects_the_engine_alone(overrides, active):
    from sd_plugin.trainers.base import SelfDistillationTrainer

    trainer = types.SimpleNamespace(options=SDFTOptions(**overrides))
    assert SelfDistillationTrainer.importance_sampling_active(trainer) is active
