"""The tools chain: `sd-plugin generate` output goes into `sd-plugin eval-stats` without a script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd_plugin.cli import main as cli_main
from sd_plugin.generate import GenerateOptions, generate_corpus

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "example_configs" / "assets" / "tiny-qwen3"


def length_reward(prompt, completion, record):
    return len(completion) / 100.0, None


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tokenizer):
    """generate's real output: 4 prompts (2 labelled good, 2 bad) x 3 samples, scored, round r1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    rows = [{"id": f"p{i}", "template_id": f"t{i % 2}", "prompt": f"Say something about {i}.", "quality": ["good", "bad"][i % 2]}
            for i in range(4)]
    path = tmp_path_factory.mktemp("chain") / "r1.jsonl"
    options = GenerateOptions(num_samples=3, max_new_tokens=8, batch_size=2, verifier="test_tools_chain:length_reward",
                              round_label="r1")
    generate_corpus(model, tokenizer, rows, path, options, model_name="tiny", progress=False)
    return path


def test_eval_stats_reads_generate_output_as_it_is(generated, capsys):
    assert cli_main(["eval-stats", str(generated), "--bootstrap", "0", "--json", str(generated.with_suffix(".stats.json"))]) == 0
    printed = capsys.readouterr().out
    assert "r1" in printed and "no row has a label" in printed  # the stage is generate's round
    result = json.loads(generated.with_suffix(".stats.json").read_text())["stages"]["r1"]
    rewards = [row["reward"] for row in map(json.loads, generated.read_text().splitlines())]
    assert result["n_generations"] == 12 and result["mean_R"] == pytest.approx(sum(rewards) / 12)
    assert result["auc"] is None and result["n_good"] == 0


def test_eval_stats_maps_generate_fields_to_scenarios_and_labels(generated, capsys):
    out = generated.with_suffix(".mapped.json")
    code = cli_main(["eval-stats", str(generated), "--label-field", "quality", "--scenario-field", "provenance.group_id",
                     "--stage-field", "provenance.model", "--bootstrap", "20", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())["stages"]["tiny"]
    assert (result["n_good"], result["n_bad"]) == (1, 1)  # groups t0 (good prompts) and t1 (bad)
    assert result["auc"] is not None


def test_eval_stats_names_the_field_it_cannot_find(generated, capsys):
    assert cli_main(["eval-stats", str(generated), "--label-field", "grade", "--bootstrap", "0"]) == 2
    assert "grade None is not good/bad/1/0" in capsys.readouterr().err


# ------------------------------------------------------------------ metric names
def test_cpu_runs_log_no_gpu_memory_metrics_and_no_perplexity(monkeypatch):
    import types

    from transformers import Trainer

    from sd_plugin.axolotl.trainers import WithoutPerplexity

    seen = []
    monkeypatch.setattr(Trainer, "log", lambda self, logs, start_time=None: seen.append(dict(logs)))
    probe = WithoutPerplexity.__new__(WithoutPerplexity)
    for device, kept in (("cpu", {"loss": 1.0}), ("cuda", {"loss": 1.0, "memory/max_allocated (GiB)": 3.5})):
        probe.args = types.SimpleNamespace(device=torch.device(device))
        WithoutPerplexity.log(probe, {"loss": 1.0, "ppl": 2.7, "memory/max_allocated (GiB)": 3.5 if device == "cuda" else 0.0})
        assert seen[-1] == kept


def test_renamed_metrics_are_logged_under_both_names_for_one_release():
    from sd_plugin.deprecated import RENAMED_METRICS, with_deprecated_metrics

    logs = {"self_distillation/reprompt_sample_fraction": 0.75, "eval_self_distillation/success_fraction": 0.5, "loss": 1.0}
    out = with_deprecated_metrics(logs, {"no_teacher_signal_fraction", "success_fraction", "clip_fraction"})
    assert out["no_teacher_signal_fraction"] == 0.25 and out["eval_success_fraction"] == 0.5
    assert "clip_fraction" not in out  # only what was logged under the new name
    # one scheme: method metrics under self_distillation/ or TRL's GRPO clip_ratio/
    assert all(new.startswith(("self_distillation/", "clip_ratio/")) for new, _ in RENAMED_METRICS.values())


# ------------------------------------------------------------------ help
def test_every_command_help_shows_its_defaults(capsys):
    """Every option of every subcommand that has a default shows it in --help; the top-level help marks as
    optional what is optional."""
    import importlib

    from sd_plugin.cli import COMMANDS, HelpFormatter
    from sd_plugin.cli import main as cli

    for command, (module_name, function_name) in COMMANDS.items():
        with pytest.raises(SystemExit):
            getattr(importlib.import_module(module_name), function_name)(["--help"])
        printed = capsys.readouterr().out
        assert printed.startswith(f"usage: sd-plugin {command}"), command
        assert "(default: " in printed, command  # the formatter is sd-plugin's (argparse's own shows none)
    assert issubclass(HelpFormatter, __import__("argparse").ArgumentDefaultsHelpFormatter)
    cli(["--help"])
    top = capsys.readouterr().out
    assert "sd-plugin merge --adapter A --out DIR" in top and "--base B" not in top  # --base is optional


def test_one_name_for_the_tool_call_verifier(capsys):
    from sd_plugin.verifiers import load_verifier

    with pytest.raises(ValueError, match="'tool_calls'") as unknown:
        load_verifier("no_such_verifier")
    assert "'tool_call'" not in str(unknown.value)
    for path in (REPO / "README.md", *(REPO / "docs").glob("*.md")):
        assert "`tool_call`" not in path.read_text(), path.name


# ------------------------------------------------------------------ the model card
def test_model_card_has_the_evaluation_model_index_license_template_and_a_task_example(tmp_path):
    from huggingface_hub import ModelCard

    from sd_plugin.model_card import base_model_license, write_model_card

    base = tmp_path / "SmolLM2-135M-Instruct"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\nThe base.\n")
    data = REPO / "example_configs" / "assets" / "data"
    config = {"base_model": str(base), "trainer_type": "sdft", "micro_batch_size": 4, "learning_rate": 1e-3,
              "datasets": [{"path": str(data / "contact_train.jsonl"), "type": "sd_plugin.axolotl.strategies.sdft"}],
              "sdft": {"teacher_template": "{question}\n\nAnswer with one line of JSON exactly like this:\n{demonstration}",
                       "eval_prompts": str(data / "contact_test.jsonl"), "eval_verifier": "sd_plugin.demo_task:ContactCardVerifier",
                       "prior_prompts": str(data / "capitals_test.jsonl")}}
    history = [{"step": 0, "eval_task_reward": 0.0, "eval_prior_reward": 0.75},
               {"step": 1, "loss": 0.4, "completions/mean_length": 27.5},
               {"step": 16, "eval_task_reward": 0.583, "eval_prior_reward": 0.875},
               {"step": 16, "train_loss": 0.3, "train_runtime": 189.0}]
    text = write_model_card(tmp_path / "card", method="sdft", base_model=str(base), training_config=config,
                            metrics=history, base_license=base_model_license(base)).read_text()
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and "License: apache-2.0 (the base model's)" in text
    results = card.data.to_dict()["model-index"][0]["results"]
    assert {r["dataset"]["name"]: r["metrics"][0]["value"] for r in results} == {"contact_test.jsonl": 0.583, "capitals_test.jsonl": 0.875}
    evaluation = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert "| `task_reward` | 0.000 | 0.583 | +0.583 |" in evaluation and "Greedy answers" in evaluation
    assert "eval_task_reward" not in text.split("## Training metrics", 1)[1].split("\n## ", 1)[0]  # once, in Evaluation
    assert "{question}\\n\\nAnswer with one line of JSON exactly like this:\\n{demonstration}" in text  # newlines shown
    assert "Make a contact card from this message" in text.split("## How to use", 1)[1]  # an example of the task
    assert str(tmp_path) not in text  # paths as names only
