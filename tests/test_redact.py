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


# ------------------------------------------------------------------------------------ issue 25.3: families, shapes, lists
GITHUB_TOKEN = "ghp_0123456789abcdefghijABCDEFGHIJ012345"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"


@pytest.mark.parametrize("key", ["api_keys", "apiKeys", "passphrase", "ssh_passphrase", "credentials", "db_passwords",
                                 "hf_tokens", "access_tokens", "client_secrets", "session_cookie"])
def test_the_whole_credential_family_is_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_tokens", "max_new_tokens", "num_keys", "keys", "special_tokens", "added_tokens"])
def test_counts_of_tokens_and_keys_are_not_secret(key):
    assert not is_secret_key(key)


def test_secrets_inside_lists_under_a_secret_key_are_masked():
    config = {"verifier_kwargs": {"api_key": [API_KEY, "second-key"], "api_keys": {"judge": API_KEY, "retries": 3}}}
    assert redact_secrets(config) == {"verifier_kwargs": {"api_key": [MASK, MASK], "api_keys": {"judge": MASK, "retries": 3}}}


def test_token_shaped_values_and_url_credentials_are_masked_under_any_key():
    config = {"notes": f"pushed with {HUB_TOKEN} yesterday", "endpoint": "https://alice:s3cret-pw@judge.example.com/v1",
              "args": ["--token", GITHUB_TOKEN, "--aws", AWS_KEY], "nested": [{"headers": ["Bearer abcdef0123456789xyz"]}],
              "base_url": "http://localhost:8000", "template": "a basic question, the bearer of news", "pad_token": "<pad>"}
    redacted = redact_secrets(config)
    text = json.dumps(redacted)
    for secret in (HUB_TOKEN, GITHUB_TOKEN, AWS_KEY, "alice", "s3cret-pw", "abcdef0123456789xyz"):
        assert secret not in text
    assert redacted["endpoint"] == "https://***@judge.example.com/v1"
    assert redacted["notes"] == "pushed with *** yesterday"
    assert redacted["base_url"] == "http://localhost:8000" and redacted["template"] == config["template"]
    assert redacted["pad_token"] == "<pad>"


def judge_with_keys(prompt, completion, record, api_keys=None, endpoint=None, passphrase=None):
    """A verifier with a list of keys, a URL with credentials and a passphrase."""
    return 0.0, None


def test_arguments_and_training_config_mask_key_lists_passphrases_and_url_credentials(tmp_path):
    from sd_plugin import SDPOConfig
    from sd_plugin.model_card import write_training_record

    kwargs = {"api_keys": [API_KEY, "other"], "endpoint": "https://bob:hunter22@judge.example.com", "passphrase": "open sesame"}
    args = SDPOConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, num_generations=2,
                      verifier="test_redact:judge_with_keys", verifier_kwargs=kwargs)
    logged, printed = json.dumps(args.to_dict()), str(args)
    write_training_record(tmp_path / "run", args.to_dict(), None)
    saved = (tmp_path / "run" / "training_config.json").read_text()
    for text in (logged, printed, saved):
        assert API_KEY not in text and "hunter22" not in text and "open sesame" not in text and "bob" not in text
    assert json.loads(saved)["verifier_kwargs"]["endpoint"] == "https://***@judge.example.com"


def test_model_card_masks_dataset_url_credentials_and_token_shapes(tmp_path):
    from sd_plugin.model_card import render_model_card

    config = {"datasets": [{"path": "https://carol:pw123456@data.example.com/set.jsonl"}], "wandb_api_key": "0" * 40,
              "sdpo": {"verifier_kwargs": {"api_keys": [API_KEY]}, "invalid_rows_file": f"/tmp/{HUB_TOKEN}/x.jsonl"}}
    text = render_model_card(method="sdpo", base_model="Qwen/Qwen3-0.6B", training_config=config, adapter_only=True)
    assert "pw123456" not in text and "carol" not in text and API_KEY not in text and HUB_TOKEN not in text
    assert "0" * 40 not in text


AXOLOTL_CARD = f"""---
library_name: peft
---

[<img src="https://raw.githubusercontent.com/axolotl-ai-cloud/axolotl/main/image/axolotl-badge-web.png"/>](https://github.com/axolotl-ai-cloud/axolotl)
<details><summary>See axolotl config</summary>

axolotl version: `0.19.0`
```yaml
base_model: Qwen/Qwen3-0.6B  # the base
hub_token: {HUB_TOKEN}
sdpo:
  verifier: my_judges:llm_judge
  verifier_kwargs:
    api_keys:
      - {API_KEY}
    max_tokens: 64
datasets:
  - path: https://dave:pw98765432@data.example.com/train.jsonl
```

</details><br>

# out
"""


def test_axolotls_adapter_card_is_cleaned_by_the_post_train_hook(tmp_path):
    from types import SimpleNamespace

    import yaml
    from axolotl.utils.dict import DictDefault
    from transformers import TrainerState

    from sd_plugin.axolotl.plugin import SelfDistillationPlugin

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text(AXOLOTL_CARD)
    cfg = DictDefault({"trainer_type": "sdpo", "output_dir": str(out), "sdpo": {"verifier": "multiple_choice"}})
    plugin = SelfDistillationPlugin()
    plugin.post_trainer_create(cfg, SimpleNamespace(args=SimpleNamespace(should_save=True), state=TrainerState()))
    plugin.post_train(cfg, model=None)
    card = (out / "README.md").read_text()
    assert HUB_TOKEN not in card and API_KEY not in card and "pw98765432" not in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config["hub_token"] == MASK and config["sdpo"]["verifier_kwargs"] == {"api_keys": [MASK], "max_tokens": 64}
    assert card.startswith("---\nlibrary_name: peft\n---") and card.rstrip().endswith("# out")
    # post_train_unload (after `axolotl train` returns) cleans a card written after post_train as well
    (out / "README.md").write_text(AXOLOTL_CARD)
    plugin.post_train_unload(cfg)
    assert HUB_TOKEN not in (out / "README.md").read_text()


def test_the_config_axolotl_adds_to_every_card_is_masked_when_training_begins(monkeypatch):
    import transformers.modelcard

    from sd_plugin.axolotl.plugin import MaskAxolotlCardSecrets

    monkeypatch.setattr(transformers.modelcard, "AUTOGENERATED_TRAINER_COMMENT",
                        "This model was trained from scratch." + AXOLOTL_CARD.split("---\n", 2)[2])
    MaskAxolotlCardSecrets().on_train_begin(None, None, None)
    comment = transformers.modelcard.AUTOGENERATED_TRAINER_COMMENT
    assert HUB_TOKEN not in comment and API_KEY not in comment and "See axolotl config" in comment


def test_a_card_whose_yaml_does_not_parse_loses_the_block_not_the_secret_check():
    from sd_plugin.redact import redact_card_text

    text = redact_card_text("```yaml\nsecret_thing: [unclosed\nplain: " + "x" * 10 + "\n```\n")
    assert "unclosed" not in text and "could not be checked for secrets" in text


def test_axolotls_debug_log_of_the_config_is_masked_in_place(tmp_path):
    from types import SimpleNamespace

    from axolotl.utils.dict import DictDefault
    from transformers import TrainerState

    from sd_plugin.axolotl.plugin import SelfDistillationPlugin

    out = tmp_path / "out"
    out.mkdir()
    config_dump = json.dumps({"learning_rate": 0.001, "hub_token": HUB_TOKEN,
                              "sdpo": {"verifier_kwargs": {"api_keys": [API_KEY, "plain-second-key"], "max_tokens": 64}},
                              "datasets": [{"path": "https://erin:pw55555555@data.example.com/t.jsonl"}]}, indent=2)
    (out / "debug.log").write_text(f"[INFO] config:\n{config_dump}\n[INFO] Starting trainer...\n")
    handle = open(out / "debug.log", "a")  # Axolotl's handler keeps the log open in append mode
    cfg = DictDefault({"trainer_type": "sdpo", "output_dir": str(out), "sdpo": {"verifier": "multiple_choice"}})
    plugin = SelfDistillationPlugin()
    plugin.post_trainer_create(cfg, SimpleNamespace(args=SimpleNamespace(should_save=True), state=TrainerState()))
    plugin.post_train(cfg, model=None)
    handle.write("[INFO] a later line\n")
    handle.close()
    log = (out / "debug.log").read_text()
    for secret in (HUB_TOKEN, API_KEY, "plain-second-key", "pw55555555", "erin"):
        assert secret not in log
    assert '"max_tokens": 64' in log and '"learning_rate": 0.001' in log
    assert log.endswith("[INFO] Starting trainer...\n[INFO] a later line\n")
