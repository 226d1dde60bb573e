"""Publishing after `axolotl train`: the plugin's post_train hook leaves the training record the model card needs."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_axolotl_plugin import PLUGIN_RAN, QUICKSTART, REPO, quickstart, run_axolotl

BASE = REPO / "example_configs" / "assets" / "tiny-qwen3"
HUB_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123"


def quickstart_cfg(**overrides):
    from axolotl.utils.dict import DictDefault

    config = yaml.safe_load(QUICKSTART.read_text())
    config.update(base_model=str(BASE), **overrides)
    return DictDefault(config)


def test_post_train_writes_the_config_and_metrics_the_card_reads(tmp_path):
    from transformers import TrainerState

    from sd_plugin.axolotl.plugin import SelfDistillationPlugin
    from sd_plugin.model_card import find_trainer_state, find_training_config, render_model_card

    state = TrainerState(global_step=2, log_history=[{"loss": 0.9, "completions/mean_length": 20.0, "step": 1},
                                                    {"loss": 0.4, "completions/mean_length": 25.0, "step": 2},
                                                    {"train_loss": 0.65, "train_runtime": 3.0, "step": 2}])
    trainer = SimpleNamespace(args=SimpleNamespace(should_save=True), state=state)
    cfg = quickstart_cfg(output_dir=str(tmp_path / "out"),
                         sdft=dict(yaml.safe_load(QUICKSTART.read_text())["sdft"], distillation_alpha=0.25))
    plugin = SelfDistillationPlugin()
    plugin.post_trainer_create(cfg, trainer)
    assert plugin.post_train(cfg, model=None) is None

    config, source = find_training_config(tmp_path / "out")
    assert source == str(tmp_path / "out" / "training_config.json") and config["sdft"]["distillation_alpha"] == 0.25
    assert json.loads(Path(find_trainer_state(tmp_path / "out")).read_text())["log_history"] == state.log_history
    card = render_model_card(method="sdft", base_model="Qwen/Qwen3-0.6B", training_config=config,
                             metrics=find_trainer_state(tmp_path / "out"))
    assert "## Training metrics" in card and "| `completions/mean_length` | 20 (step 1) | 25 (step 2) |" in card

    # Inert without trainer_type, and on processes that do not save.
    for cfg, trainer in ((quickstart_cfg(trainer_type=None, output_dir=str(tmp_path / "plain")), trainer),
                         (quickstart_cfg(output_dir=str(tmp_path / "rank1")), SimpleNamespace(args=SimpleNamespace(should_save=False), state=state))):
        plugin = SelfDistillationPlugin()
        plugin.post_trainer_create(cfg, trainer)
        plugin.post_train(cfg, model=None)
        assert not Path(cfg.output_dir).exists()


@pytest.mark.slow
def test_card_after_axolotl_train_and_sd_plugin_merge_has_the_metrics(tmp_path):
    config = quickstart(tmp_path, max_steps=2, hub_token=HUB_TOKEN)  # Axolotl pastes the YAML file into its card
    trained = run_axolotl(config, tmp_path)
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-3000:]
    assert PLUGIN_RAN + "sdft" in output
    adapter = tmp_path / "out"
    axolotl_card = (adapter / "README.md").read_text()
    assert "See axolotl config" in axolotl_card and HUB_TOKEN not in axolotl_card and "hub_token: '***'" in axolotl_card
    state = json.loads((adapter / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "completions/mean_length" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]

    merged = tmp_path / "merged"
    merge = subprocess.run([sys.executable, "-m", "sd_plugin.cli", "merge", "--base", str(BASE),
                            "--adapter", str(adapter), "--out", str(merged)], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert merge.returncode == 0, (merge.stdout + merge.stderr)[-3000:]
    card = (merged / "README.md").read_text()
    assert "## Training metrics" in card
    last = logged[-1]["completions/mean_length"]
    assert f"| `completions/mean_length` | {logged[0]['completions/mean_length']:.4g} (step 1) | {last:.4g} (step 2) |" in card
    assert "### SDFT options (`sdft:` block)" in card and "| `learning_rate` | 0.001 |" in card
    assert str(tmp_path) not in card  # local paths are named by their last component only
