"""Evaluation during training: greedy answers to held-out prompt sets, scored, logged, and tabled before/after."""

import json
import logging
import os
from pathlib import Path

import pytest
from datasets import Dataset

from sd_plugin import SDFTConfig, SDFTTrainer
from sd_plugin.evaluation import PromptSet, read_prompt_set
from sd_plugin.testing import build_model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def prompt_sets(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [
        {"prompt": "Make a card for Ann, 30, Rome.", "answer": {"name": "Ann", "age": 30, "city": "Rome"}},
        {"prompt": [{"role": "user", "content": "Card: Bo, 41, Oslo."}], "answer": {"name": "Bo", "age": 41, "city": "Oslo"}},
    ])
    prior = write_jsonl(tmp_path / "prior.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"}] * 3)
    return task, prior


def make_args(tmp_path, **overrides):
    task, prior = prompt_sets(tmp_path)
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                    max_completion_length=8, report_to="none", save_strategy="no", learning_rate=5e-3, use_cpu=True,
                    seed=0, eval_prompts=task, eval_verifier="sd_plugin.demo_task:ContactCardVerifier",
                    prior_prompts=prior, prior_verifier="sd_plugin.demo_task:AnswerContainsVerifier")
    settings.update(overrides)
    return SDFTConfig(**settings)


def test_evaluation_runs_at_step_zero_every_n_steps_and_at_the_end_and_logs_metrics(tmp_path, tokenizer, quickstart_rows, capsys,
                                                                                    caplog):
    rows = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:4]])
    args = make_args(tmp_path, eval_generation_steps=1, eval_num_generations=3, eval_temperature=0.5)
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=args,
                          train_dataset=rows, processing_class=tokenizer)
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        trainer.train()
    # The random tiny model writes no card before or after: the run ends saying so, for greedy and sampled answers.
    warned = [r.getMessage() for r in caplog.records if "did not learn the task" in r.getMessage()]
    assert len(warned) == 2 and "held-out task reward did not rise (0.000 at step 0 -> 0.000 at step 2)" in warned[0]
    assert "sampled_reward" in warned[1] and "sampled answers" in warned[1]
    evaluated = {entry["step"]: entry for entry in trainer.state.log_history if "eval_task_reward" in entry}
    assert sorted(evaluated) == [0, 1, 2]
    for key in ("eval_task_reward", "eval_task_pass_rate", "eval_task_format_rate", "eval_task_completion_length",
                "eval_prior_reward", "eval_prior_pass_rate", "eval_prior_completion_length"):
        assert key in evaluated[2]
    assert "eval_prior_format_rate" not in evaluated[2]  # AnswerContainsVerifier reports no format
    assert 0 < evaluated[0]["eval_task_completion_length"] <= 8
    # sampled answers too: pass@1 over eval_num_generations samples at the rollout temperature and at eval_temperature
    for key in ("eval_task_sampled_pass_rate", "eval_task_sampled_reward", "eval_task_inference_pass_rate",
                "eval_prior_sampled_pass_rate", "eval_prior_inference_reward"):
        assert key in evaluated[2]
    table = capsys.readouterr().out
    assert ("Held-out evaluation: step 0 -> step 2 (greedy; sampled: 3 per prompt at temperature 1; inference: 3 per "
            "prompt at temperature 0.5)") in table
    assert "task   reward" in table and "prior  pass_rate" in table
    lines = {" ".join(line.split()[:3]) for line in table.splitlines()}
    assert {"task reward 2", "task sampled_pass_rate 6", "prior inference_pass_rate 9", "prior pass_rate 3"} <= lines
    record = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert record["sets"]["task"]["sample_sizes"] == {"greedy": 2, "sampled": 6, "inference": 6}
    assert record["before"]["step"] == 0 and record["after"]["step"] == 2
    assert record["after"]["metrics"]["task"]["sampled_pass_rate"] == evaluated[2]["eval_task_sampled_pass_rate"]
    assert record["settings"]["inference_temperature"] == 0.5 and sorted(record["history"]) == ["0", "1", "2"]


def test_evaluation_logs_reach_the_reporters(tmp_path, tokenizer, quickstart_rows):
    from transformers import TrainerCallback

    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    rows = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in quickstart_rows[:2]])
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, max_steps=1),
                          train_dataset=rows, processing_class=tokenizer, callbacks=[Recorder()])
    trainer.train()
    assert sum("eval_task_reward" in logs for logs in seen) == 2  # step 0 and the end


def test_prompt_set_scores_exact_answers_and_format(tokenizer, tmp_path, monkeypatch):
    task, _ = prompt_sets(tmp_path)
    prompt_set = PromptSet("task", task, "sd_plugin.demo_task:ContactCardVerifier", tokenizer, "prompt", 512)
    replies = iter([[1]] * 2)
    monkeypatch.setattr("sd_plugin.evaluation.greedy_answers", lambda *a, **k: [next(replies) for _ in range(2)])
    texts = iter(['{"name": "Ann", "age": 30, "city": "Rome"}', '{"name": "Bo", "age": "41", "city": "Oslo"}'])
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **k: next(texts))
    metrics, _ = prompt_set.score(None, tokenizer, 8, [0])
    assert metrics == {"reward": 0.5, "pass_rate": 0.5, "completion_length": 1.0, "format_rate": 1.0}


@pytest.mark.parametrize("overrides,match", [
    ({"eval_prompts": "missing.jsonl"}, "eval_prompts: no such file 'missing.jsonl'"),
    ({"eval_verifier": None}, "eval_prompts is set but eval_verifier is not"),
    ({"prior_verifier": "no_such_module:verify"}, "prior_verifier: Cannot load verifier 'no_such_module:verify'"),
    ({"eval_generation_steps": -1}, "eval_generation_steps must be >= 0"),
    ({"eval_num_generations": -1}, "eval_num_generations must be >= 0"),
    ({"eval_temperature": 0.0}, "eval_temperature must be a finite number > 0"),
    ({"eval_temperature": 0.7, "eval_num_generations": 0}, "eval_temperature is set but eval_num_generations is 0"),
])
def test_bad_evaluation_options_fail_in_the_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_bad_prompt_set_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_prompt_set(str(path))
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text"):
        read_prompt_set(str(path))
    path.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing column 'prompt'"):
        read_prompt_set(str(path))


def test_prompt_set_is_read_like_the_commands_read_jsonl(tmp_path):
    """One JSONL reader (sd_plugin.files): a byte-order mark, as editors write it, is not a bad line."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes('{"prompt": "first"}\n\n{"prompt": "second"}\n'.encode("utf-8-sig"))
    assert [record["messages"][-1]["content"] for record in read_prompt_set(str(path))] == ["first", "second"]


def test_evaluation_options_are_yaml_keys(tmp_path):
    from sd_plugin.axolotl.args import block_model

    task, prior = prompt_sets(tmp_path)
    block = block_model("sdft").model_validate({"eval_prompts": task, "eval_verifier": "sd_plugin.demo_task:ContactCardVerifier",
                                                "prior_prompts": prior, "eval_generation_steps": 5})
    assert block.eval_generation_steps == 5 and block.prior_verifier is None


def test_quickstart_config_trains_the_demo_model_with_held_out_and_prior_evaluation():
    import yaml

    from sd_plugin.axolotl.args import _validated_block

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "example_configs" / "quickstart.yml").read_text())
    assert config["base_model"] == "./outputs/SmolLM2-135M-Instruct"  # `sd-plugin demo-model`'s default --out
    cwd = os.getcwd()
    os.chdir(repo)  # the config's paths are relative to the repository, as in the README's command
    try:
        block = _validated_block("sdft", config["sdft"])
    finally:
        os.chdir(cwd)
    assert block.eval_verifier == "sd_plugin.demo_task:ContactCardVerifier"
    assert block.prior_prompts.endswith("capitals_test.jsonl")


def test_greedy_evaluation_ignores_the_checkpoint_generation_config(tmp_path, tokenizer):
    """A checkpoint's generation_config.json (repetition_penalty, ...) must not turn "greedy" into something else."""
    import copy

    import torch

    task, _ = prompt_sets(tmp_path)
    prompt_set = PromptSet("task", task, "sd_plugin.demo_task:ContactCardVerifier", tokenizer, "prompt", 512)
    model = build_model("qwen3", tokenizer)
    polluted = copy.deepcopy(model)
    polluted.generation_config.repetition_penalty = 5.0
    polluted.generation_config.no_repeat_ngram_size = 1
    polluted.generation_config.suppress_tokens = list(range(10, 600))
    eos = [tokenizer.eos_token_id]
    _, clean_texts = prompt_set.score(model, tokenizer, 12, eos)
    _, polluted_texts = prompt_set.score(polluted, tokenizer, 12, eos)
    assert polluted_texts == clean_texts
    # and "greedy" is the argmax of the model's own scores, token by token
    ids = torch.tensor([prompt_set.prompts[0]])
    expected = []
    with torch.no_grad():
        for _ in range(12):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token in eos:
                break
            expected.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert clean_texts[0] == tokenizer.decode(expected, skip_special_tokens=False)


def test_evaluation_scores_the_text_training_verifies(tmp_path, tokenizer, monkeypatch):
    """One decoding rule: a tool call in <tool_call> tags (special tokens of the Qwen3 tokenizer) scores 1 in the
    held-out evaluation as it does in SDPO / SD-Zero training (verify_completion), not 0 with the tags dropped."""
    from sd_plugin.verifiers import ToolCallVerifier, verify_completion

    answer = [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    path = write_jsonl(tmp_path / "tools.jsonl", [{"prompt": "Weather in Oslo?", "answer": answer}])
    prompt_set = PromptSet("task", path, "tool_calls", tokenizer, "prompt", 512)
    reply = tokenizer.encode('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
                             add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in reply
    monkeypatch.setattr("sd_plugin.evaluation.greedy_answers", lambda *a, **k: [reply])
    metrics, texts = prompt_set.score(None, tokenizer, 32, [tokenizer.eos_token_id])
    verdict = verify_completion(ToolCallVerifier(), tokenizer, reply, prompt_set.records[0],
                                end_of_turn_ids=[tokenizer.eos_token_id], success_reward_threshold=1.0)
    assert texts == [verdict.text] and verdict.reward == 1.0
    assert metrics["reward"] == 1.0 and metrics["pass_rate"] == 1.0


def test_a_run_whose_task_score_did_not_rise_is_named_greedy_and_sampled_apart():
    from sd_plugin.evaluation import no_gain_warnings

    def history(greedy, sampled):
        return {0: {"task": {"reward": 0.0, "sampled_reward": 0.0}, "prior": {"reward": 0.75}},
                16: {"task": {"reward": greedy, "sampled_reward": sampled}, "prior": {"reward": 0.5}}}

    assert no_gain_warnings(history(0.583, 0.1)) == []  # the prior's fall is the collapse watch's to report
    only_sampled = no_gain_warnings(history(0.583, 0.0))  # the quickstart's case: greedy learned, samples did not
    assert len(only_sampled) == 1 and "sampled_reward did not rise (0.000 at step 0 -> 0.000 at step 16)" in only_sampled[0]
    assert len(no_gain_warnings(history(0.0, 0.0))) == 2
    assert no_gain_warnings({0: history(0.0, 0.0)[0]}) == []  # one evaluation: nothing to compare
    assert no_gain_warnings({0: {"prior": {"reward": 1.0}}, 4: {"prior": {"reward": 0.0}}}) == []  # no task set


def test_sampled_pass_at_1_reports_what_greedy_hides(tmp_path, tokenizer, monkeypatch):
    """A model whose greedy answer is right but whose samples are wrong is not reported as learned."""
    from sd_plugin.evaluation import EvaluationSettings, evaluate_sets, evaluation_table

    task, _ = prompt_sets(tmp_path)
    prompt_set = PromptSet("task", task, "sd_plugin.demo_task:ContactCardVerifier", tokenizer, "prompt", 512)
    cards = ['{"name": "Ann", "age": 30, "city": "Rome"}', '{"name": "Bo", "age": 41, "city": "Oslo"}']
    encoded = [tokenizer.encode(card, add_special_tokens=False) + [tokenizer.eos_token_id] for card in cards]
    seen = []

    def fake_answers(model, prompts, options, eos, pad, batch_size=16):
        seen.append((options.do_sample, options.temperature, options.num_generations))
        if not options.do_sample:
            return encoded
        return [tokenizer.encode("no idea", add_special_tokens=False)] * (len(prompts) * options.num_generations)

    monkeypatch.setattr("sd_plugin.evaluation.answers", fake_answers)
    settings = EvaluationSettings(max_new_tokens=16, num_generations=4, temperature=0.9, inference_temperature=0.6)
    results, _ = evaluate_sets(None, tokenizer, [prompt_set], settings, [tokenizer.eos_token_id])
    assert seen == [(False, 1.0, 1), (True, 0.9, 4), (True, 0.6, 4)]
    assert results["task"]["pass_rate"] == 1.0
    assert results["task"]["sampled_pass_rate"] == 0.0 and results["task"]["inference_pass_rate"] == 0.0
    table = evaluation_table({0: results}, [prompt_set], settings)
    assert "task   sampled_pass_rate               8   0.000" in table


def test_sampled_evaluation_is_seeded_and_leaves_the_training_random_stream_alone(tmp_path, tokenizer):
    import torch

    from sd_plugin.evaluation import EvaluationSettings, evaluate_sets

    task, _ = prompt_sets(tmp_path)
    prompt_set = PromptSet("task", task, "sd_plugin.demo_task:ContactCardVerifier", tokenizer, "prompt", 512)
    model = build_model("qwen3", tokenizer)
    settings = EvaluationSettings(max_new_tokens=6, num_generations=2, seed=3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, _ = evaluate_sets(model, tokenizer, [prompt_set], settings, [tokenizer.eos_token_id], step=5)
    assert torch.equal(torch.get_rng_state(), state)
    again, _ = evaluate_sets(model, tokenizer, [prompt_set], settings, [tokenizer.eos_token_id], step=5)
    assert again == first


def test_model_card_carries_the_held_out_results_as_model_index(tmp_path):
    import yaml

    from sd_plugin.model_card import write_model_card

    record = {
        "settings": {"temperature": 1.0, "inference_temperature": 0.7, "num_generations": 2,
                     "decoding": "greedy; sampled: 2 per prompt at temperature 1"},
        "sets": {"task": {"path": "contact_test.jsonl", "verifier": "v", "prompts": 48,
                          "sample_sizes": {"greedy": 48, "sampled": 96, "inference": 96}}},
        "before": {"label": "step 0", "step": 0, "metrics": {"task": {"pass_rate": 0.0, "sampled_pass_rate": 0.0}}},
        "after": {"label": "step 16", "step": 16, "metrics": {"task": {"pass_rate": 0.58, "sampled_pass_rate": 0.31,
                                                                        "completion_length": 24.0}}},
    }
    (tmp_path / "eval_results.json").write_text(json.dumps(record))
    text = write_model_card(tmp_path, method="sdft", base_model="HuggingFaceTB/SmolLM2-135M-Instruct").read_text()
    front = yaml.safe_load(text.split("---")[1])
    result = front["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "contact_test.jsonl", "type": "task"}
    metrics = {m["type"]: m for m in result["metrics"]}
    assert metrics["pass_rate"]["value"] == 0.58 and metrics["sampled_pass_rate"]["value"] == 0.31
    assert metrics["sampled_pass_rate"]["args"] == {"temperature": 1.0, "num_generations": 2}
    assert "| task | pass@1 (sampled) | 96 | 0 | 0.31 |" in text


def test_evaluate_command_scores_an_adapter_against_its_base(tmp_path, tokenizer, capsys):
    import yaml
    from peft import LoraConfig, get_peft_model

    from sd_plugin.cli import main

    task, prior = prompt_sets(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    base = str(repo / "example_configs" / "assets" / "tiny-qwen3")
    adapter = get_peft_model(build_model("qwen3", tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    config = {"base_model": base, "trainer_type": "sdft", "seed": 1,
              "sdft": {"eval_prompts": task, "eval_verifier": "sd_plugin.demo_task:ContactCardVerifier",
                       "prior_prompts": prior, "prior_verifier": "sd_plugin.demo_task:AnswerContainsVerifier",
                       "eval_max_new_tokens": 6, "eval_num_generations": 2}}
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(tmp_path / "cfg.yml"), "--adapter", str(tmp_path / "adapter"), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Held-out evaluation: base -> adapter (greedy; sampled: 2 per prompt at temperature 1)" in table
    assert "set    metric                          n  before   after   change" in table
    assert " ".join(next(line for line in table.splitlines() if line.startswith("prior  sampled_pass_rate")).split()[:3]) == "prior sampled_pass_rate 6"
    record = json.loads(out.read_text())
    assert record["before"]["label"] == "base" and record["after"]["label"] == "adapter"
    assert set(record["after"]["metrics"]) == {"task", "prior"}
    # without --adapter: one column, the model itself
    assert main(["evaluate", str(tmp_path / "cfg.yml")]) == 0
    assert "Held-out evaluation: step 0 (greedy" in capsys.readouterr().out


def test_evaluate_command_refuses_a_config_without_prompt_sets(tmp_path, capsys):
    import yaml

    from sd_plugin.cli import main

    (tmp_path / "cfg.yml").write_text(yaml.safe_dump({"base_model": "x", "trainer_type": "sdft", "sdft": {}}))
    assert main(["evaluate", str(tmp_path / "cfg.yml")]) == 2
    assert "sets neither eval_prompts nor prior_prompts" in capsys.readouterr().err
