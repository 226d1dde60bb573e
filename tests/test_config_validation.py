"""Bad configuration gets one clear error naming the key before anything loads (issue 25, section 4): in the
Axolotl YAML (through Axolotl's own config class with the plugin's keys mixed in, as `axolotl train` builds it)
and in the Python configs."""

import math

import pytest
import yaml
from test_axolotl_plugin import QUICKSTART, REPO

from sd_plugin.axolotl.args import SelfDistillationArgs

TINY = REPO / "example_configs/assets/tiny-qwen3"


@pytest.fixture(scope="module")
def host_config_class():
    """Axolotl's config class with the plugin's keys, built as Axolotl's merge_input_args builds it."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    class AxolotlInputConfigWithPlugin(AxolotlInputConfig, SelfDistillationArgs):
        pass

    return AxolotlInputConfigWithPlugin


def quickstart(**overrides) -> dict:
    config = yaml.safe_load(QUICKSTART.read_text())
    config.update(base_model=str(TINY), **overrides)
    return config


def sdpo_config(**block) -> dict:
    return quickstart(trainer_type="sdpo", sdft=None, micro_batch_size=8,  # completions: whole groups of 8 (TRL)
                      sdpo={"verifier": "multiple_choice", "max_prompt_length": 384, "max_completion_length": 32, **block})


def refusal(host_config_class, config) -> str:
    with pytest.raises(ValueError) as refused:
        host_config_class.model_validate(config)
    return str(refused.value)


# ------------------------------------------------------------------------------------ the YAML
def test_the_quickstart_config_is_valid_and_not_changed_by_validation(host_config_class):
    config = quickstart()
    block = dict(config["sdft"])
    parsed = host_config_class.model_validate(config)
    assert parsed.trainer_type == "sdft" and config["sdft"] == block
    host_config_class.model_validate(config)  # twice: the first validation left the config as it was


@pytest.mark.parametrize("overrides,message", [
    ({"sequence_len": "512"}, "sequence_len must be an integer (tokens), got '512'"),
    ({"trainer_type": ["sdft"]}, "trainer_type must be one of sdft, sdpo, sdzero (a single name), got ['sdft']"),
    ({"learning_rate": -1e-5}, "learning_rate must be a finite number > 0, got -1e-05"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
])
def test_bad_top_level_values_are_refused_naming_the_key(host_config_class, overrides, message):
    assert message in refusal(host_config_class, quickstart(**overrides))


@pytest.mark.parametrize("key,value,block", [
    ("teacher_model_kind", "ema", "sdft"),
    ("distillation_alpha", 0.5, "sdft"),
    ("rollout_temperature", 0.5, "sdft"),  # a deprecated name belongs where its new name does
    ("sdpo_mode", "policy", "sdpo"),
    ("mix_in_ratio", 0.3, "round2_mixer"),
])
def test_a_plugin_key_at_the_top_level_is_refused_naming_its_block(host_config_class, key, value, block):
    message = refusal(host_config_class, quickstart(**{key: value}))
    assert f"{key} is a key of the {block}: block" in message and f"move it into {block}:" in message


def test_the_valid_sdpo_and_sdzero_configs_the_refusals_start_from_are_accepted(host_config_class):
    host_config_class.model_validate(sdpo_config(sdpo_mode="hybrid", distillation_weight=0.5, epsilon=0.3))
    host_config_class.model_validate(sdzero_config())


def test_a_learning_rate_yaml_reads_as_a_string_is_still_a_number(host_config_class):
    assert yaml.safe_load("learning_rate: 2e-5")["learning_rate"] == "2e-5"
    host_config_class.model_validate(quickstart(learning_rate="2e-5"))
    assert "learning_rate must be a finite number > 0, got 'fast'" in refusal(host_config_class, quickstart(learning_rate="fast"))


def test_the_hosts_own_keys_are_not_mistaken_for_plugin_keys(host_config_class):
    # eval_max_new_tokens and seed are keys of Axolotl's config too: they stay where Axolotl reads them
    host_config_class.model_validate(quickstart(eval_max_new_tokens=64, seed=3))


@pytest.mark.parametrize("block,message", [
    ({"success_reward_threshold": float("nan")}, "success_reward_threshold must be"),
    ({"success_reward_threshold": 5}, "success_reward_threshold must be a number in [0, 1]"),
    ({"success_reward_threshold": -1}, "success_reward_threshold must be a number in [0, 1]"),
    ({"sdpo_mode": "hybrid", "distillation_weight": -5}, "needs 0 < distillation_weight < 1"),
    ({"sdpo_mode": "hybrid", "distillation_weight": float("nan")}, "distillation_weight must be a finite number"),
    ({"sdpo_mode": "hybrid", "epsilon": float("inf")}, "epsilon must be a finite number"),
    ({"num_generations": True}, "sdpo.num_generations must be an integer, got True"),
    ({"verifier": "no_such_verifier"}, "verifier: Unknown verifier 'no_such_verifier'"),
    ({"verifier": "no_such_module:judge"}, "importing 'no_such_module' failed"),
    ({"verifier_kwargs": {"answer_feild": "answer"}}, "answer_feild"),
])
def test_bad_sdpo_options_are_refused_at_validation_naming_the_key(host_config_class, block, message):
    text = refusal(host_config_class, sdpo_config(**block))
    assert message in text, text
    assert "Traceback" not in text


def sdzero_config(**block) -> dict:
    return quickstart(trainer_type="sdzero", sdft=None,
                      sdzero={"phase": "distill", "verifier": "boxed_math", "max_prompt_length": 384,
                              "max_completion_length": 32, **block})


def test_sdzero_distill_resolves_its_verifier_at_validation(host_config_class):
    config = sdzero_config(verifier_kwargs={"rel_toll": 0.1})
    assert "rel_toll" in refusal(host_config_class, config)
    config["sdzero"]["success_reward_threshold"] = 2.0
    config["sdzero"]["verifier_kwargs"] = {"rel_tol": 0.1}
    assert "success_reward_threshold must be a number in [0, 1]" in refusal(host_config_class, config)


# ------------------------------------------------------------------------------------ the Python configs
@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": "0.7"}, "temperature must be a number, got '0.7' (str)"),
    ({"max_completion_length": "16"}, "max_completion_length must be an integer, got '16' (str)"),
    ({"num_generations": True}, "num_generations must be an integer, got True (bool)"),
    ({"top_k": 2.5}, "top_k must be an integer or null, got 2.5"),
    ({"success_reward_threshold": math.nan}, "success_reward_threshold must be a finite number"),
    ({"success_reward_threshold": 5.0}, "success_reward_threshold must be a number in [0, 1]"),
    ({"sdpo_mode": "hybrid", "distillation_weight": -5.0}, "needs 0 < distillation_weight < 1"),
    ({"sdpo_mode": "hybrid", "epsilon": math.inf}, "epsilon must be a finite number"),
    ({"learning_rate": -1e-5}, "learning_rate must be a finite number > 0"),
    ({"verifier": "multiple_choice", "verifier_kwargs": {"answer_feild": "x"}}, "answer_feild"),
    ({"verifier_kwargs": "answer_field=x"}, "verifier_kwargs must be a mapping or null"),
])
def test_python_sdpo_config_refuses_bad_values_naming_the_key(tmp_path, kwargs, message):
    from sd_plugin import SDPOConfig

    arguments = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "verifier": "multiple_choice",
                 "num_generations": 2, **kwargs}
    with pytest.raises(ValueError) as refused:
        SDPOConfig(**arguments)
    assert message in str(refused.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"distillation_alpha": "0.5"}, "distillation_alpha must be a number"),
    ({"lambda_on_policy": float("nan")}, "lambda_on_policy must be a finite number"),
    ({"skip_invalid": "yes"}, "skip_invalid must be true or false"),
])
def test_python_sdft_options_refuse_bad_types_naming_the_key(kwargs, message):
    from sd_plugin.trainers.sdft import SDFTOptions

    with pytest.raises(ValueError, match=message):
        SDFTOptions(**kwargs).check()


def test_revision_options_refuse_a_threshold_outside_the_rewards():
    from sd_plugin.revisions import RevisionOptions

    for threshold in (float("nan"), 5.0, -1.0):
        with pytest.raises(ValueError, match="success_reward_threshold"):
            RevisionOptions(verifier="multiple_choice", success_reward_threshold=threshold).check()
    with pytest.raises(ValueError, match="num_revisions must be an integer"):
        RevisionOptions(verifier="multiple_choice", num_revisions="2").check()


def test_generate_and_mix_configs_name_the_key_of_a_wrong_type():
    from sd_plugin.generate import GenerateOptions
    from sd_plugin.mixer import CorpusSource, MixConfig, mix_corpora

    with pytest.raises(ValueError, match="num_samples must be an integer, got '4'"):
        GenerateOptions(num_samples="4").check()
    with pytest.raises(ValueError, match="temperature must be a finite number, got nan"):
        GenerateOptions(temperature=float("nan")).check()
    with pytest.raises(ValueError, match="mix_in_ratio must be a number, got '0.5'"):
        mix_corpora([CorpusSource("unused.jsonl", 1)], MixConfig(mix_in_ratio="0.5"))
