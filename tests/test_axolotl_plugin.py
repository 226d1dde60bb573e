"""The Axolotl binding: schema checks in-process, and real `axolotl train` runs in subprocesses (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sd_plugin.axolotl.args import SelfDistillationArgs, block_model, options_class

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "example_configs" / "quickstart-tiny.yml"
PLUGIN_RAN = "sd-plugin: training with trainer_type="


def run_axolotl(config: dict, tmp_path: Path, name: str = "cfg.yml", timeout: int = 600) -> subprocess.CompletedProcess:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(Path(sys.executable).parent / "axolotl"), "train", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def quickstart(tmp_path: Path, **overrides) -> dict:
    config = yaml.safe_load(QUICKSTART.read_text())
    config.update(output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=3)
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


# ------------------------------------------------------------------ schema (fast)
def test_every_options_field_is_a_yaml_key_and_back():
    from dataclasses import fields

    for method in ("sdft", "sdpo", "sdzero"):
        dataclass_fields = {f.name for f in fields(options_class(method))}
        assert set(block_model(method).model_fields) == dataclass_fields


@pytest.mark.parametrize(
    "config,match",
    [
        ({"trainer_type": "sdfx"}, "trainer_type"),
        ({"trainer_type": "sdft", "rl": "dpo"}, "rl: dpo and trainer_type: sdft cannot be combined"),
        ({"trainer_type": "sdft", "sample_packing": True}, "sample_packing"),
        ({"trainer_type": "sdft", "sdft": {"distilation_alpha": 0.5}}, "distilation_alpha"),
        ({"trainer_type": "sdft", "sdft": {"teacher_update_rate": 0.05}}, "sdft: teacher_update_rate is set but teacher_model_kind is 'base'"),
        ({"trainer_type": "sdft", "sdft": {"max_prompt_length": 1000, "max_teacher_prompt_length": 500}}, "max_teacher_prompt_length"),
        ({"trainer_type": "sdft", "sdft": {"distillation_alpha": 2}}, "alpha must be in"),
        ({"sdft": {"teacher_model_kind": "ema"}}, "trainer_type is not"),
        ({"trainer_type": "sdft", "sequence_len": 256, "sdft": {"max_prompt_length": 256}}, "sequence_len"),
        ({"trainer_type": "sdft", "context_parallel_size": 2}, "context parallelism"),
        ({"trainer_type": "sdpo", "sdpo": {"verifier": "multiple_choice"}, "context_parallel": {"size": 2}}, "context parallelism"),
    ],
)
def test_schema_rejects_contradictions(config, match):
    with pytest.raises(ValueError, match=match):
        SelfDistillationArgs.model_validate(config)


@pytest.mark.parametrize("settings,auto", [
    ({"auto_resume_from_checkpoints": True}, True),
    ({"auto_resume_from_checkpoints": True, "resume_from_checkpoint": "out/checkpoint-8"}, False),
    ({"resume_from_checkpoint": "out/checkpoint-8"}, False),
    ({}, False),
])
def test_only_axolotls_own_pick_of_the_last_checkpoint_may_fall_back(settings, auto):
    """post_trainer_create runs before Axolotl fills resume_from_checkpoint from auto_resume_from_checkpoints: a
    checkpoint the user named is never swapped for an earlier one (sd_plugin/checkpoints.py)."""
    import types

    from axolotl.utils.dict import DictDefault

    from sd_plugin.axolotl.plugin import SelfDistillationPlugin

    trainer = types.SimpleNamespace()
    SelfDistillationPlugin().post_trainer_create(DictDefault({"trainer_type": "sdft", **settings}), trainer)
    assert trainer.auto_resume is auto


@pytest.mark.parametrize("strategy", ["sdft", "trace", "prompts", "sdzero"])
@pytest.mark.parametrize("cfg,match", [
    ({"trainer_type": "sdft"}, "plugins: is not set; add\n  plugins:\n    - sd_plugin.SelfDistillationPlugin"),
    ({"plugins": ["axolotl.integrations.liger.LigerPlugin"], "trainer_type": "sdft"}, "add\n  plugins:"),
    ({"plugins": ["sd_plugin.SelfDistillationPlugin"]}, "trainer_type is not set"),
])
def test_dataset_strategies_refuse_a_config_without_the_plugin(tokenizer, strategy, cfg, match, monkeypatch):
    """Without the plugin (or trainer_type) Axolotl would train plain SFT on rows whose labels are all -100."""
    import collections
    import importlib

    from axolotl.integrations.base import PluginManager

    monkeypatch.setattr(PluginManager.get_instance(), "plugins", collections.OrderedDict())  # none loaded
    module = importlib.import_module(f"sd_plugin.axolotl.strategies.{strategy}")
    with pytest.raises(ValueError, match=match) as error:
        module.load(tokenizer, cfg, {"path": "data.jsonl", "type": module.__name__})
    assert f"datasets: type sd_plugin.axolotl.strategies.{strategy} " in str(error.value)


def test_dataset_strategies_accept_the_plugin_loaded_from_its_entry_point(tokenizer, monkeypatch):
    """Axolotl 0.21 loads entry-point plugins for configs that do not list them: that registration counts."""
    import collections

    from axolotl.integrations.base import PluginManager

    from sd_plugin.axolotl.plugin import SelfDistillationPlugin
    from sd_plugin.axolotl.strategies.sdft import load

    loaded = collections.OrderedDict({"sd_plugin.SelfDistillationPlugin": SelfDistillationPlugin()})
    monkeypatch.setattr(PluginManager.get_instance(), "plugins", loaded)
    assert load(tokenizer, {"trainer_type": "sdft"}, {"path": "data.jsonl"}).method == "sdft"


def test_schema_fills_method_defaults():
    parsed = SelfDistillationArgs.model_validate({"trainer_type": "sdft", "sdft": {"teacher_model_kind": "ema", "teacher_update_rate": 0.02}})
    assert parsed.sdft["teacher_update_rate"] == 0.02 and parsed.sdft["num_loss_tokens_to_skip"] == 3
    assert SelfDistillationArgs.model_validate({}).trainer_type is None


# ------------------------------------------------------------------ end to end through `axolotl train`
@pytest.mark.slow
def test_quickstart_trains_with_the_plugin_trainer(tmp_path):
    result = run_axolotl(quickstart(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert PLUGIN_RAN + "sdft" in output  # not Axolotl's silent SFT fallback
    assert "'completions/mean_length'" in output
    # the loss is logged once, as `loss` (kl / distillation_loss would repeat it); exp(a KL) is no perplexity
    assert "'kl'" not in output and "distillation_loss'" not in output and "'ppl'" not in output
    assert "'teacher_check/in_context_gain'" in output  # the teacher check of the start, logged with the first step
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    ["ema", "full", "qlora", "qwen3_5", "auto"],
)
def test_variants_train_end_to_end(tmp_path, variant):
    overrides = {}
    if variant == "ema":
        overrides["sdft"] = dict(yaml.safe_load(QUICKSTART.read_text())["sdft"], teacher_model_kind="ema", teacher_update_rate=0.05)
    elif variant == "full":
        overrides.update(adapter=None, lora_r=None, lora_alpha=None, lora_dropout=None, lora_target_modules=None,
                         lora_mlp_kernel=None, lora_qkv_kernel=None, lora_o_kernel=None, learning_rate=1e-4)
    elif variant == "qlora":
        overrides.update(adapter="qlora", load_in_4bit=True, bnb_4bit_compute_dtype="float32")
    elif variant == "auto":  # the strategy renders with paper; the trainer picks and renders again before step 1
        overrides["sdft"] = dict(yaml.safe_load(QUICKSTART.read_text())["sdft"], teacher_template="auto", teacher_check_rows=2)
    elif variant == "qwen3_5":
        overrides.update(base_model="./example_configs/assets/tiny-qwen3_5",
                         lora_target_modules=["q_proj", "v_proj", "in_proj_qkv", "in_proj_z", "out_proj", "down_proj"])
    result = run_axolotl(quickstart(tmp_path, **overrides), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert PLUGIN_RAN + "sdft" in output and "'completions/mean_length'" in output
    if variant == "auto":
        assert "teacher_template: auto chose" in output
        saved = json.loads((tmp_path / "out" / "training_config.json").read_text())
        assert saved["sdft"]["teacher_template"] == "auto"
        assert saved["teacher_template_chosen"] in {t["name"] for t in saved["teacher_check"]["templates"]}


@pytest.mark.slow
def test_without_trainer_type_axolotl_trains_plain_sft(tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": f"{i}"}) for i in range(8)))
    config = quickstart(tmp_path, trainer_type=None, sdft=None,
                        datasets=[{"path": str(data), "ds_type": "json", "type": "alpaca"}])
    result = run_axolotl(config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert PLUGIN_RAN not in output and "'completions/mean_length'" not in output and "'loss'" in output


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"trainer_type": "sdfx"}, "trainer_type"),
        ({"rl": "dpo"}, "rl: dpo and trainer_type: sdft cannot be combined"),
        ({"datasets": [{"path": "./example_configs/assets/data/quickstart_sdft.jsonl", "ds_type": "json",
                        "type": "sd_plugin.axolotl.strategies.sdft", "field_human": "question"}]},
         "missing column 'question'"),
        # Without `plugins:` Axolotl used to train its own SFT on these rows to the end: loss 0, exit 0, an adapter.
        ({"plugins": None}, "add\n  plugins:\n    - sd_plugin.SelfDistillationPlugin"),
    ],
)
def test_bad_configs_exit_nonzero_before_training(tmp_path, overrides, message):
    result = run_axolotl(quickstart(tmp_path, **overrides), tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output
    assert "'completions/mean_length'" not in output and "'loss'" not in output
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_round2_mixer_block_feeds_the_mixed_corpus_to_training(tmp_path):
    rows = [json.loads(line) for line in (REPO / "example_configs/assets/data/quickstart_sdft.jsonl").read_text().splitlines()]
    for round_index, chunk in ((1, rows[:32]), (2, rows[32:])):
        lines = [json.dumps(dict(r, reward=0.5 + 0.01 * i, template_id=f"t{i % (12 if round_index == 1 else 3)}"))
                 for i, r in enumerate(chunk)]
        (tmp_path / f"round{round_index}.jsonl").write_text("\n".join(lines) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    config = quickstart(
        tmp_path,
        round2_mixer={"inputs": [{"path": str(tmp_path / "round1.jsonl"), "round": 1}, {"path": str(tmp_path / "round2.jsonl"), "round": 2}],
                      "output_path": str(mixed), "size": 24, "seed": 0, "group_cap": 4, "dedup_threshold": None},
        datasets=[{"path": str(mixed), "ds_type": "json", "type": "sd_plugin.axolotl.strategies.sdft"}],
    )
    result = run_axolotl(config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "round2_mixer wrote" in output and PLUGIN_RAN + "sdft" in output
    mixed_rows = [json.loads(line) for line in mixed.read_text().splitlines()]
    assert len(mixed_rows) == 24 and all("_provenance" in r for r in mixed_rows)


VALIDATE = """
import sys, yaml
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault
for path in sys.argv[1:]:
    cfg = DictDefault(yaml.safe_load(open(path)))
    prepare_plugins(cfg)
    out = validate_config(cfg, capabilities={"bf16": True, "fp8": False, "tf32": True, "n_gpu": 2, "n_node": 1,
                          "compute_capability": "sm_90"}, env_capabilities={"torch_version": "2.13.0"})
    method = out["trainer_type"]
    print("VALID", path, method, len(out[method]))
"""


def test_every_example_config_passes_axolotls_schema():
    """Axolotl's own validate_config (GPU capabilities) with the plugin's schema merged in, one subprocess."""
    configs = sorted(str(p) for p in (REPO / "example_configs").glob("*.yml"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1")
    result = subprocess.run([sys.executable, "-c", VALIDATE, *configs], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    valid = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("VALID")]
    assert valid == configs
