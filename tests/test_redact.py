"""Secrets and local paths stay out of what the project writes or prints: training_config.json, the logged training
arguments, the model card (sd_plugin.redact)."""

import dataclasses
import json

import pytest
from transformers import TrainingArguments

from sd_plugin.redact import MASK, is_secret_key, redact_secrets

API_KEY = "sk-live-0123456789abcdef"
HUB_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz"


def judge(prompt, completion, record, api_key=None, max_tokens=16):
    """A verifier that takes a credential, as an LLM judge would."""
    assert api_key == API_KEY  # the verifier itself gets the real value
    return 0.0, None


@pytest.mark.parametrize("key", ["api_key", "apiKey", "OPENAI_API_KEY", "hf_token", "token", "password", "Authorization",
                                 "x-api-key", "client_secret", "auth"])
def test_credential_keys_are_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_tokens", "num_loss_tokens_to_skip", "tokenizer", "tokenizer_type", "pad_token",
                                 "eos_token", "pad_token_id", "keys", "teacher_template", "monkey"])
def test_ordinary_settings_are_not_secret(key):
    assert not is_secret_key(key)


def test_nested_secret_strings_are_masked_and_the_rest_kept():
    config = {"sdpo": {"verifier_kwargs": {"api_key": API_KEY, "max_tokens": 64, "headers": [{"Authorization": "Bearer x"}]}},
              "use_auth_token": True, "special_tokens": {"pad_token": "<|endoftext|>"}}
    redacted = redact_secrets(config)
    assert redacted == {"sdpo": {"verifier_kwargs": {"api_key": MASK, "max_tokens": 64, "headers": [{"Authorization": MASK}]}},
                        "use_auth_token": True, "special_tokens": {"pad_token": "<|endoftext|>"}}
    assert config["sdpo"]["verifier_kwargs"]["api_key"] == API_KEY  # a copy: the caller's config is untouched


def test_sdpo_arguments_mask_the_verifier_key_when_saved_logged_or_printed(tmp_path, tokenizer, quickstart_rows):
    from datasets import Dataset
    from peft import LoraConfig

    from sd_plugin import SDPOConfig, SDPOTrainer
    from sd_plugin.testing import build_model

    args = SDPOConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, max_completion_length=8,
                      per_device_train_batch_size=4, num_generations=2, verifier="test_redact:judge",
                      verifier_kwargs={"api_key": API_KEY, "max_tokens": 32}, hub_token=HUB_TOKEN)
    logged = args.to_dict()  # what W&B / TensorBoard get
    assert logged["verifier_kwargs"] == {"api_key": MASK, "max_tokens": 32}
    assert API_KEY not in str(args) and HUB_TOKEN not in str(args)
    data = Dataset.from_list([{"prompt": row["prompt"], "answer": row["answer"]} for row in quickstart_rows[:2]])
    trainer = SDPOTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert trainer.verifier.keywords["api_key"] == API_KEY
    trainer.save_model(str(tmp_path / "adapter"))
    saved = (tmp_path / "adapter" / "training_config.json").read_text()
    assert API_KEY not in saved and HUB_TOKEN not in saved
    assert json.loads(saved)["verifier_kwargs"] == {"api_key": MASK, "max_tokens": 32}


def test_axolotl_training_arguments_mask_secrets_in_sd_options():
    from sd_plugin.axolotl.args import SelfDistillationTrainingArgs

    # Axolotl builds its arguments class as (its mixins, the plugin's mixin, TrainingArguments).
    @dataclasses.dataclass
    class AxolotlLikeArguments(SelfDistillationTrainingArgs, TrainingArguments):
        pass

    args = AxolotlLikeArguments(output_dir="unused", report_to="none",
                                sd_options={"verifier": "x:y", "verifier_kwargs": {"api_key": API_KEY}})
    assert args.to_dict()["sd_options"] == {"verifier": "x:y", "verifier_kwargs": {"api_key": MASK}}
    assert args.sd_options["verifier_kwargs"]["api_key"] == API_KEY


def test_model_card_shows_no_secrets_and_no_local_directories(tmp_path):
    from sd_plugin.model_card import render_model_card

    home = tmp_path / "home" / "alice"
    config = {"base_model": str(home / "models" / "Qwen3-8B"), "learning_rate": 1e-5, "hub_token": HUB_TOKEN,
              "datasets": [{"path": str(home / "data" / "chem.jsonl")}, {"path": "my-org/chemistry"}],
              "sdpo": {"verifier": "my_judges:llm_judge", "verifier_kwargs": {"api_key": API_KEY, "max_tokens": 64},
                       "invalid_rows_file": str(home / "runs" / "invalid.jsonl")}}
    text = render_model_card(method="sdpo", base_model=str(home / "models" / "Qwen3-8B"), training_config=config,
                             adapter_only=True)
    assert API_KEY not in text and HUB_TOKEN not in text and str(home) not in text and "alice" not in text
    assert "- chem.jsonl" in text and "- my-org/chemistry" in text
    assert '"api_key": "***"' in text and '"max_tokens": 64' in text
    assert "| `invalid_rows_file` | invalid.jsonl |" in text
    assert "Qwen3-8B (local checkpoint)" in text and 'from_pretrained("Qwen3-8B"' in text
