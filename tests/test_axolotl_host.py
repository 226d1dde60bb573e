"""The plugin inside Axolotl's own machinery: entry point, inert hooks, `post_lora_merge`, `axolotl merge-lora`,
gradient checkpointing / activation offloading around the rollout loop.

Fast tests call the hooks in-process; the slow ones run real `axolotl` subprocesses (helpers shared with
tests/test_axolotl_plugin.py).
"""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from test_axolotl_plugin import PLUGIN_RAN, QUICKSTART, REPO, quickstart, run_axolotl

BASE = REPO / "example_configs" / "assets" / "tiny-qwen3"
GRADIENT_CHECKPOINTING_CACHE_WARNING = "is incompatible with gradient checkpointing"


def plain_sft_config() -> dict:
    """An ordinary Axolotl SFT config that never mentions the plugin's keys (what 0.21 loads entry points for)."""
    return {"base_model": str(BASE), "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "sequence_len": 512,
            "adapter": "lora", "output_dir": "out", "micro_batch_size": 2, "learning_rate": 1e-4}


def quickstart_cfg(**overrides):
    """The quickstart config as Axolotl's DictDefault (base model as an absolute path)."""
    from axolotl.utils.dict import DictDefault

    config = yaml.safe_load(QUICKSTART.read_text())
    config.update(base_model=str(BASE), **overrides)
    return DictDefault(config)


def save_merged_float32(adapter_dir: Path, output_dir: Path) -> None:
    """What `axolotl merge-lora` leaves for a float32 base: base + adapter folded, float32 safetensors, tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(BASE).save_pretrained(output_dir)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A LoRA adapter on tiny-qwen3 with random, clearly non-zero B matrices (no training needed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 0.05)
    model.save_pretrained(root)
    return root


def safetensors_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    found = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            found |= {handle.get_slice(key).get_dtype() for key in handle.keys()}
    return found


# ------------------------------------------------------------------ entry point and inertness (fast)
def test_entry_point_resolves_to_the_plugin_class():
    from sd_plugin.axolotl.plugin import SelfDistillationPlugin

    found = [entry for entry in entry_points(group="axolotl.plugins") if entry.value.startswith("sd_plugin")]
    assert len(found) == 1, found
    assert found[0].load() is SelfDistillationPlugin


def test_hooks_are_inert_without_trainer_type(adapter_dir, tmp_path, monkeypatch):
    """Axolotl 0.21 loads entry-point plugins for every config: a config without trainer_type must not change."""
    from axolotl.utils.data import shared
    from axolotl.utils.dict import DictDefault

    from sd_plugin.axolotl.plugin import SelfDistillationPlugin

    plugin = SelfDistillationPlugin()
    cfg = DictDefault(plain_sft_config())
    before = dict(cfg)
    monkeypatch.setattr(shared, "DATASET_HASH_CONFIG_EXTRA_FIELDS", tuple(shared.DATASET_HASH_CONFIG_EXTRA_FIELDS))
    hash_before = shared.generate_dataset_hash_from_config(cfg, cfg.datasets, "tok")

    assert plugin.register(cfg) is None
    # register widens the prepared-dataset hash fields, but keys a config does not set leave its hash alone
    assert shared.generate_dataset_hash_from_config(cfg, cfg.datasets, "tok") == hash_before
    assert plugin.get_training_args(cfg) is None
    assert plugin.get_trainer_cls(cfg) is None
    assert plugin.get_collator_cls_and_kwargs(cfg) is None  # plain None, never (None, None)
    assert plugin.get_collator_cls_and_kwargs(cfg, is_eval=True) is None

    merged = tmp_path / "merged"
    save_merged_float32(adapter_dir, merged)
    files_before = {path.name: path.stat().st_mtime_ns for path in merged.iterdir()}
    assert plugin.post_lora_merge(cfg, str(adapter_dir), str(merged)) is None
    assert {path.name: path.stat().st_mtime_ns for path in merged.iterdir()} == files_before  # no card, no cast
    assert safetensors_dtypes(merged) == {"F32"}
    assert dict(cfg) == before


def test_hooks_are_active_with_trainer_type():
    """The counterpart of the inertness test: the same hooks do their work once trainer_type is set."""
    from sd_plugin.axolotl.plugin import SelfDistillationPlugin
    from sd_plugin.trainers.base import SelfDistillationCollator
    from sd_plugin.trainers.sdft import SDFTTrainer

    plugin = SelfDistillationPlugin()
    cfg = quickstart_cfg()
    assert plugin.get_training_args(cfg) == {"sd_options": dict(cfg.sdft), "remove_unused_columns": False}
    assert issubclass(plugin.get_trainer_cls(cfg), SDFTTrainer)
    assert plugin.get_collator_cls_and_kwargs(cfg) == (SelfDistillationCollator, {})


# ------------------------------------------------------------------ post_lora_merge (fast)
def test_post_lora_merge_hook_casts_to_bf16_and_writes_the_card(adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sd_plugin.axolotl.plugin import SelfDistillationPlugin

    merged = tmp_path / "merged"
    save_merged_float32(adapter_dir, merged)
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        float32_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids).logits

    cfg = quickstart_cfg(sdft={"teacher_model_kind": "ema", "teacher_update_rate": 0.05, "distillation_alpha": 0.25})
    assert SelfDistillationPlugin().post_lora_merge(cfg, str(adapter_dir), str(merged)) is None

    assert safetensors_dtypes(merged) == {"BF16"}
    assert json.loads((merged / "config.json").read_text()).get("dtype") == "bfloat16"
    with torch.no_grad():
        bf16_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids).logits
    scale = float32_logits.abs().max()
    assert (bf16_logits - float32_logits).abs().max() <= scale / 16  # only bf16 rounding, no lost tensors

    card = (merged / "README.md").read_text()
    assert "### SDFT options (`sdft:` block)" in card
    assert "| `teacher_update_rate` | 0.05 |" in card and "| `distillation_alpha` | 0.25 |" in card
    assert "quickstart_sdft.jsonl" in card  # the config's dataset
    assert "| `r` | 4 |" in card  # the adapter's own LoRA settings, not the config's lora_r: 8
    assert "Weights: bfloat16 safetensors" in card


# ------------------------------------------------------------------ real Axolotl runs (slow)
def axolotl_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.slow
def test_axolotl_merge_lora_on_the_trained_quickstart_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin.axolotl.plugin import SelfDistillationPlugin

    config = quickstart(tmp_path, max_steps=2)
    trained = run_axolotl(config, tmp_path)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert PLUGIN_RAN + "sdft" in trained.stdout + trained.stderr
    adapter = tmp_path / "out"
    assert (adapter / "adapter_model.safetensors").is_file()

    merge = subprocess.run([str(Path(sys.executable).parent / "axolotl"), "merge-lora", str(tmp_path / "cfg.yml"),
                            f"--lora-model-dir={adapter}"], cwd=REPO, env=axolotl_env(), capture_output=True, text=True,
                           timeout=600)
    assert merge.returncode == 0, (merge.stdout + merge.stderr)[-3000:]
    merged = adapter / "merged"  # Axolotl 0.19 writes <output_dir>/merged
    assert (merged / "model.safetensors").is_file() and (merged / "chat_template.jinja").is_file()

    tokenizer = AutoTokenizer.from_pretrained(merged)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the molar mass of water?"}],
                                         tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        from_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), str(adapter))
        reference = peft_model(input_ids).logits
        with peft_model.disable_adapter():
            base_only = peft_model(input_ids).logits
    assert (from_merged - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert (reference - base_only).abs().max() > 0  # the adapter was trained, so the comparison means something

    # Axolotl 0.21 then calls post_lora_merge(cfg, adapter_path, output_path); 0.19 does not, so call it here.
    SelfDistillationPlugin().post_lora_merge(quickstart_cfg(**{k: v for k, v in config.items() if k != "base_model"}),
                                             str(adapter), str(merged))
    assert safetensors_dtypes(merged) == {"BF16"}
    assert "### SDFT options (`sdft:` block)" in (merged / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "memory_settings",
    [
        pytest.param({"gradient_checkpointing": True}, id="gradient_checkpointing"),
        # TRL's OffloadActivations needs an accelerator (torch.accelerator.current_accelerator() is None on CPU):
        # Axolotl fails to build any trainer with activation offloading on a CPU, SFT included.
        pytest.param({"gradient_checkpointing": "offload"}, id="offload", marks=pytest.mark.gpu),
        pytest.param({"gradient_checkpointing": True, "activation_offloading": "legacy"}, id="offload_legacy",
                     marks=pytest.mark.gpu),
    ],
)
def test_rollouts_train_under_gradient_checkpointing(tmp_path, memory_settings):
    result = run_axolotl(quickstart(tmp_path, max_steps=2, **memory_settings), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert PLUGIN_RAN + "sdft" in output and "'completions/mean_length'" in output
    assert '"gradient_checkpointing": true' in output  # Axolotl's resolved config: the setting reached training
    # generate() runs in eval mode, where the KV cache stays on: no use_cache/checkpointing conflict is reported
    assert GRADIENT_CHECKPOINTING_CACHE_WARNING not in output
