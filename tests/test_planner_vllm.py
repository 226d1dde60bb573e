"""The planner with vLLM rollouts: colocate reserves its GPU share (all phases, or only the rollout with sleep
mode) instead of generate's KV cache; server mode puts nothing on the training GPUs."""

import pytest

from sd_plugin.planner import GiB, load_config, plan_memory
from tests.test_planner import CONFIG_1X80


def with_block(**block):
    cfg = load_config(str(CONFIG_1X80))
    cfg["sdft"] = {**cfg["sdft"], **block}
    return cfg


def test_colocate_holds_vllms_share_in_every_phase_instead_of_generates_cache():
    hf = plan_memory(with_block(), gpu_memory="80GB")
    colocate = plan_memory(with_block(use_vllm=True, vllm_gpu_memory_utilization=0.25), gpu_memory="80GB")
    share = int(0.25 * 80 * GiB)
    assert colocate.vllm_engine == share and hf.vllm_engine == 0
    assert colocate.rollout_kv_cache == 0 and colocate.rollout_working_set == 0 and hf.rollout_kv_cache > 0
    persistent = hf.weights + hf.lora_params + hf.optimizer_states + hf.teacher_state
    assert colocate.phases["rollout"] == persistent + share
    for phase in ("teacher_forward", "loss", "backward", "optimizer"):
        assert colocate.phases[phase] == hf.phases[phase] + share
    assert colocate.peak > hf.peak + share - 1 * GiB  # the share sits beside the training step's own peak


def test_sleep_mode_frees_the_share_outside_the_rollout():
    hf = plan_memory(with_block(), gpu_memory="80GB")
    sleeping = plan_memory(with_block(use_vllm=True, vllm_enable_sleep_mode=True), gpu_memory="80GB")
    for phase in ("teacher_forward", "loss", "backward", "optimizer"):
        assert sleeping.phases[phase] == hf.phases[phase]
    assert sleeping.phases["rollout"] > hf.phases["rollout"] - hf.rollout_kv_cache - hf.rollout_working_set


def test_server_mode_puts_nothing_of_vllm_on_the_training_gpu():
    server = plan_memory(with_block(use_vllm=True, vllm_mode="server"), gpu_memory="80GB")
    assert server.vllm_engine == 0 and server.rollout_kv_cache == 0
    assert any("trl vllm-serve" in note for note in server.notes)


def test_a_share_too_small_for_the_weights_is_flagged_and_a_colocate_overflow_gets_vllm_suggestions():
    small = plan_memory(with_block(use_vllm=True, vllm_gpu_memory_utilization=0.05), gpu_memory="80GB")
    assert any("raise vllm_gpu_memory_utilization" in note for note in small.notes)
    full = plan_memory(with_block(use_vllm=True, vllm_gpu_memory_utilization=0.6), gpu_memory="80GB")
    assert not full.fits
    assert any(s.startswith("vllm_enable_sleep_mode: true") for s in full.suggestions)


@pytest.mark.parametrize("name", ["sdft-qwen3.5-9b-64k-1x80gb-vllm.yml", "sdpo-qwen3-8b-chemistry-vllm.yml"])
def test_vllm_example_configs_fit_and_validate(name):
    from sd_plugin.axolotl.args import SelfDistillationArgs
    from tests.conftest import REPO

    path = REPO / "example_configs" / name
    cfg = load_config(str(path))
    SelfDistillationArgs.model_validate({k: cfg.get(k) for k in ("trainer_type", "sdft", "sdpo")})
    block = cfg[cfg["trainer_type"]]
    assert block["use_vllm"] is True
    assert plan_memory(cfg, gpu_memory="80GB").fits
