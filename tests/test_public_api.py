"""The public surface stays put when code moves between modules: the package's names, the CLI's subcommands,
the Axolotl `trainer_type`s and dataset `type:`s, and the module-level names the README and docs tell users to
import. A rename or a move that drops one of them fails here, naming it.

Option (YAML key) names are not pinned here: test_docs pins them against the README's option tables, so a
renamed option must be renamed in the README too.
"""

from __future__ import annotations

import importlib

import pytest

import sd_plugin
from sd_plugin.cli import COMMANDS

PACKAGE_NAMES = [
    "SDFTConfig", "SDFTTrainer", "SDPOConfig", "SDPOTrainer", "SDZeroConfig", "SDZeroTrainer",
    "SelfDistillationPlugin", "DivergenceOptions", "chunked_distillation_loss", "divergence",
]
SUBCOMMANDS = ["stats", "eval-stats", "mix", "merge", "plan", "evaluate", "collect-revisions", "generate", "demo-model",
               "check-teacher"]
TRAINER_TYPES = ["sdft", "sdpo", "sdzero"]
DATASET_TYPES = ["sdft", "trace", "prompts", "sdzero"]  # type: sd_plugin.axolotl.strategies.<name>
# module -> names the README, docs/ and example_configs/ use (or that the trainers' docstrings point users to).
DOCUMENTED = {
    "sd_plugin.trainers.sdft": ["SDFTOptions", "SDFTConfig", "SDFTTrainer"],
    "sd_plugin.trainers.sdpo": ["SDPOOptions", "SDPOConfig", "SDPOTrainer"],
    "sd_plugin.trainers.sdzero": ["SDZeroOptions", "SDZeroConfig", "SDZeroTrainer", "srt_rows"],
    "sd_plugin.trainers.base": ["SelfDistillationOptions", "SelfDistillationTrainer", "SelfDistillationCollator"],
    "sd_plugin.stats": ["corpus_stats", "evaluation_metrics", "bootstrap_intervals", "auc_mann_whitney",
                        "near_duplicates", "stats_main", "eval_stats_main"],
    "sd_plugin.mixer": ["mix_corpora", "CorpusSource", "MixConfig", "MixResult", "write_mix_outputs", "mix_from_config",
                        "DiversityPenalizedReward", "diversity_penalty", "main"],
    "sd_plugin.revisions": ["collect_revisions", "RevisionOptions", "main"],
    "sd_plugin.generate": ["generate_corpus", "GenerateOptions", "main"],
    "sd_plugin.rollout": ["generate_rollouts"],
    "sd_plugin.model_card": ["write_model_card"],
    "sd_plugin.merge": ["publish", "merge_adapter", "package_adapter", "plan_publish", "main"],
    "sd_plugin.data": ["split_trace"],
    "sd_plugin.verifiers": ["load_verifier", "safe_verify", "VerifierResult", "MultipleChoiceVerifier",
                            "ToolCallVerifier", "BoxedMathVerifier", "PythonTestsVerifier"],
}


def test_package_exports_exactly_its_public_names():
    assert sd_plugin.__all__ == sorted(PACKAGE_NAMES)
    assert isinstance(sd_plugin.__version__, str)


@pytest.mark.parametrize("name", [n for n in PACKAGE_NAMES if n != "SelfDistillationPlugin"])
def test_package_name_resolves(name):
    assert getattr(sd_plugin, name) is not None


def test_the_axolotl_plugin_resolves():
    pytest.importorskip("axolotl")
    assert sd_plugin.SelfDistillationPlugin.__name__ == "SelfDistillationPlugin"


def test_cli_has_exactly_its_subcommands_and_each_runs_a_function():
    assert list(COMMANDS) == SUBCOMMANDS
    for command, (module, function) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), function)), command


def test_axolotl_trainer_types_and_dataset_types_are_unchanged():
    from sd_plugin.axolotl.args import METHODS, options_class

    assert list(METHODS) == TRAINER_TYPES
    for method in TRAINER_TYPES:
        assert options_class(method).__name__.endswith("Options")
    for name in DATASET_TYPES:
        assert callable(importlib.import_module(f"sd_plugin.axolotl.strategies.{name}").load), name


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_documented_names_are_importable_where_the_docs_say(module):
    loaded = importlib.import_module(module)
    missing = [name for name in DOCUMENTED[module] if not hasattr(loaded, name)]
    assert not missing, f"{module} lost {missing}"
