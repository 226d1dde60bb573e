"""The teacher check (`sd-plugin check-teacher`, `teacher_template: auto`, the trainers' check at the start) on the
tiny local model: what it measures, how it ranks templates, what the trainer does with the result."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from sd_plugin import SDFTConfig, SDFTTrainer
from sd_plugin import teacher_check as tc
from sd_plugin.contexts import TEMPLATES, render_ids, sdft_teacher_messages
from sd_plugin.data import sdft_record
from sd_plugin.testing import build_model
from tests.conftest import REPO

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
ROWS = [{"prompt": f"Card for person {i}", "demonstration": f"#### {i * 7}", "answer": i * 7} for i in range(4)]


class FinalNumber:
    """Passes a reply `#### N` with N = the row's answer (a verifier with a field the rows carry)."""

    def __call__(self, prompt, completion, record):
        return float(completion.strip() == f"#### {record['answer']}")


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    return build_model("qwen3", tokenizer)


def copy_for(template_name):
    """A greedy_answers stand-in: under `template_name` the teacher writes the demonstration, otherwise "no"."""
    def greedy(model, tokenizer, prompts, max_new_tokens, eos, batch_size=16):
        text = tokenizer.decode(prompts[0])
        marker = TEMPLATES[template_name].split("{demonstration}")[0].replace("{question}", "").strip()
        answers = []
        for ids in prompts:
            decoded = tokenizer.decode(ids)
            demo = decoded.rsplit("####", 1)[-1].split("<")[0].split("\n")[0].strip()
            answers.append(tokenizer(f"#### {demo}", add_special_tokens=False)["input_ids"] if marker in text else
                           tokenizer("no", add_special_tokens=False)["input_ids"])
        return answers
    return greedy


def test_demonstration_logprobs_equal_the_full_forward(model, tokenizer):
    prompts = [tokenizer("a b c", add_special_tokens=False)["input_ids"], tokenizer("d", add_special_tokens=False)["input_ids"]]
    targets = [tokenizer(" x y", add_special_tokens=False)["input_ids"], tokenizer(" z w v u", add_special_tokens=False)["input_ids"]]
    got = tc.demonstration_logprobs(model, prompts, targets, chunk=2)
    for prompt, target, value in zip(prompts, targets, got):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0].float()
        logprobs = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(target)[:, None])
        assert value == pytest.approx(logprobs.mean().item(), abs=1e-4)


def test_similarity_normalises_case_space_and_reasoning():
    assert tc.similarity("<think>hm</think>  Hello   WORLD ", "hello world") == 1.0
    assert tc.similarity("abc", "xyz") == 0.0
    assert 0.0 < tc.similarity("#### 42", "#### 41") < 1.0


def test_a_template_under_which_the_teacher_copies_wins_and_is_called_so(model, tokenizer, monkeypatch):
    monkeypatch.setattr("sd_plugin.evaluation.greedy_answers", copy_for("copy"))
    result = tc.check_teacher(model, tokenizer, ROWS, ["paper", "copy", "like_this"], verifier=FinalNumber(),
                              verifier_name="final", configured="paper")
    by_name = {s.name: s for s in result.scores}
    assert by_name["copy"].exact_match == 1.0 and by_name["copy"].verifier_pass_rate == 1.0
    assert by_name["copy"].similarity == 1.0
    assert by_name["paper"].exact_match == 0.0 and by_name["paper"].verifier_pass_rate == 0.0
    assert result.best == "copy"
    # The gain is the teacher's mean log-prob of the demonstration minus the student's, both measured.
    for score in result.scores:
        assert score.in_context_gain == pytest.approx(score.teacher_logprob - score.student_logprob)
    if by_name["copy"].in_context_gain > 0:
        assert "SDFT can teach it" in by_name["copy"].verdict
    assert "cannot teach it" in by_name["paper"].verdict or "no signal" in by_name["paper"].verdict
    assert "set teacher_template: copy" in result.verdict
    table = result.table()
    assert "copy" in table and "paper" in table and result.verdict in table
    assert json.loads(json.dumps(result.to_dict()))["best"] == "copy"


def test_teacher_prompt_is_the_trainers(model, tokenizer, monkeypatch):
    """The check scores exactly the teacher prompts the trainer would build for each template."""
    seen = []

    def record(model, tokenizer, prompts, max_new_tokens, eos, batch_size=16):
        seen.append(prompts)
        return [[tokenizer.eos_token_id]] * len(prompts)

    monkeypatch.setattr("sd_plugin.evaluation.greedy_answers", record)
    tc.check_teacher(model, tokenizer, ROWS[:2], ["expert_reference"])
    record0 = sdft_record(ROWS[0])
    expected = render_ids(tokenizer, sdft_teacher_messages(record0.messages, ROWS[0]["demonstration"], "expert_reference"))
    assert seen[0][0] == expected


def test_a_verifier_that_fails_the_demonstrations_is_left_out(model, tokenizer):
    def needs_gold(prompt, completion, record):
        return float(completion == record["gold"])  # the rows have no "gold": it raises, scores 0

    result = tc.check_teacher(model, tokenizer, ROWS[:2], ["paper"], verifier=needs_gold, verifier_name="needs_gold",
                              max_new_tokens=4)
    assert result.scores[0].verifier_pass_rate is None
    assert "passes 0 of 2 demonstrations" in result.verifier_note


def test_check_teacher_command_prints_a_table_and_json(tmp_path):
    command = [sys.executable, "-m", "sd_plugin.cli", "check-teacher", "example_configs/quickstart-tiny.yml", "--rows", "2",
               "--templates", "paper,copy", "--max-new-tokens", "4"]
    out = subprocess.run(command + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [t["name"] for t in result["templates"]] == ["paper", "copy"]
    assert result["best"] in ("paper", "copy") and result["templates"][0]["rows"] == 2
    assert {"exact_match", "similarity", "in_context_gain", "verifier_pass_rate"} <= set(result["templates"][0])
    table = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert table.returncode == 0 and "in context" in table.stdout and "best template:" in table.stdout


@pytest.mark.parametrize("extra,match", [(["--templates", "nonsense"], "neither a known name"),
                                         (["--rows", "0"], "--rows must be >= 1")])
def test_check_teacher_command_refuses_bad_input(extra, match):
    out = subprocess.run([sys.executable, "-m", "sd_plugin.cli", "check-teacher", "example_configs/quickstart-tiny.yml", *extra],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and match in out.stderr, out.stderr


def make_trainer(tmp_path, model, tokenizer, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                    max_completion_length=8, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                    teacher_check_rows=4)
    settings.update(overrides)
    return SDFTTrainer(model=model, args=SDFTConfig(**settings), train_dataset=Dataset.from_list(ROWS),
                       processing_class=tokenizer, peft_config=LoraConfig(**LORA))


def test_auto_trains_with_the_best_template_and_records_it(tmp_path, model, tokenizer, monkeypatch):
    monkeypatch.setattr("sd_plugin.evaluation.greedy_answers", copy_for("like_this"))
    trainer = make_trainer(tmp_path, model, tokenizer, teacher_template="auto",
                           teacher_template_candidates=["{question}\n\nSay:\n{demonstration}"])
    assert trainer.teacher_template_chosen == "like_this"
    names = [s.name for s in trainer.teacher_check.scores]
    assert set(TEMPLATES) <= set(names) and "custom:Say:" in names
    # The teacher prompts of every row are the chosen template's.
    for row, raw in zip(trainer.train_dataset, ROWS):
        record = sdft_record(raw)
        assert row["teacher_input_ids"] == render_ids(tokenizer, sdft_teacher_messages(record.messages, raw["demonstration"], TEMPLATES["like_this"]))
    monkeypatch.undo()
    trainer.train()
    first = trainer.state.log_history[0]
    assert "loss" in first and first["teacher_check/exact_match"] == 1.0 and "teacher_check/in_context_gain" in first
    trainer.save_model()
    saved = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert saved["teacher_template"] == "auto" and saved["teacher_template_chosen"] == "like_this"
    assert saved["teacher_template_chosen_text"] == TEMPLATES["like_this"]
    assert {t["name"] for t in saved["teacher_check"]["templates"]} == set(names)


def test_no_in_context_gain_warns_naming_the_template(tmp_path, model, tokenizer, monkeypatch, caplog):
    calls = []

    def logprobs(model, prompts, targets, chunk=64):
        calls.append(len(prompts))
        return [-1.0] * len(prompts) if len(calls) == 1 else [-1.5] * len(prompts)  # student first, then the teacher

    monkeypatch.setattr(tc, "demonstration_logprobs", logprobs)
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        trainer = make_trainer(tmp_path, model, tokenizer, teacher_template="expert_reference")
    warned = [r.getMessage() for r in caplog.records if "in-context gain" in r.getMessage()]
    assert warned and "teacher template expert_reference" in warned[0] and "-0.500 <= 0" in warned[0]
    assert trainer.teacher_check.score("expert_reference").in_context_gain == pytest.approx(-0.5)
    assert [s.name for s in trainer.teacher_check.scores] == ["expert_reference"]  # not auto: the configured one only


def test_a_configured_template_the_teacher_cannot_follow_warns_before_training(tmp_path, model, tokenizer, monkeypatch,
                                                                               caplog):
    """The default `paper` on a task whose teacher writes something else: positive gain, nothing of the task."""
    calls = []

    def logprobs(model, prompts, targets, chunk=64):
        calls.append(len(prompts))
        return [-1.5] * len(prompts) if len(calls) == 1 else [-1.0] * len(prompts)  # the context helps (+0.5)

    monkeypatch.setattr(tc, "demonstration_logprobs", logprobs)
    monkeypatch.setattr("sd_plugin.evaluation.greedy_answers", copy_for("like_this"))  # "no" under paper
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        make_trainer(tmp_path, model, tokenizer, teacher_template="paper", eval_verifier=f"{__name__}:FinalNumber")
    warned = [r.getMessage() for r in caplog.records if "SDFT cannot teach it" in r.getMessage() and "checked rows" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("teacher template paper:")
    assert "the eval_verifier passes 0% of 4 checked rows" in warned[0] and "teacher_template: auto" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        make_trainer(tmp_path, build_model("qwen3", tokenizer), tokenizer, teacher_template="like_this",
                     eval_verifier=f"{__name__}:FinalNumber")
    assert not [r for r in caplog.records if "checked rows" in r.getMessage()]


def test_teacher_check_rows_zero_turns_it_off(tmp_path, model, tokenizer, monkeypatch):
    monkeypatch.setattr(tc, "check_teacher", lambda *a, **k: pytest.fail("the check ran"))
    trainer = make_trainer(tmp_path, model, tokenizer, teacher_check_rows=0)
    assert trainer.teacher_check is None


@pytest.mark.parametrize("overrides,match", [
    (dict(teacher_template="auto", teacher_check_rows=0), "teacher_check_rows must be"),
    (dict(teacher_template_candidates=["{question} {demonstration}"]), "teacher_template is not auto"),
    (dict(teacher_template="auto", teacher_template_candidates=["no placeholder"]), "teacher_template_candidates:"),
])
def test_bad_auto_options_fail_in_the_config(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        SDFTConfig(output_dir=str(tmp_path), report_to="none", **overrides)


def test_axolotl_schema_takes_auto_and_candidates():
    from sd_plugin.axolotl.args import _validated_block

    block = _validated_block("sdft", {"teacher_template": "auto", "teacher_template_candidates": ["A:\n{demonstration}"],
                                      "teacher_check_rows": 4})
    assert block.teacher_template_candidates == ["A:\n{demonstration}"]


def test_city_tag_task_files_are_the_generators_and_the_verifier_scores_them(tmp_path):
    from sd_plugin.demo_task import CityTagVerifier, write_demo_data

    write_demo_data(tmp_path)
    for name in ("city_train.jsonl", "city_test.jsonl"):
        assert (tmp_path / name).read_text() == (REPO / "example_configs" / "assets" / "data" / name).read_text()
    rows = [json.loads(line) for line in (tmp_path / "city_train.jsonl").read_text().splitlines()]
    verifier = CityTagVerifier()
    assert len(rows) == 128 and all(verifier(r["prompt"], r["demonstration"], r).reward == 1.0 for r in rows)
    row = rows[0]
    city = row["answer"]
    assert verifier(None, f"{row['prompt'][0]['content'].split()[2]} lives in {city}.", row).reward == 0.0
    assert verifier.format_score(None, f"{row['prompt'][0]['content']}", row) == 0.0
    assert verifier(None, "CITY: ATLANTIS", row).reward == 0.0 and verifier.format_score(None, "CITY: ATLANTIS", row) == 1.0
    assert verifier(None, f"CITY: {city}", row).reward == 0.0 or city.isupper()  # not in capitals: no pass


def test_auto_renders_again_the_rows_of_the_axolotl_strategy(tmp_path, model, tokenizer, monkeypatch):
    """`axolotl train` path: the dataset strategy renders with paper (the template is not chosen yet) and keeps the
    source record; the trainer picks the template and renders every teacher prompt again before the first step."""
    from sd_plugin.axolotl.strategies import SDFTStrategy

    cfg = {"trainer_type": "sdft", "sdft": {"teacher_template": "auto"}, "output_dir": str(tmp_path),
           "plugins": ["sd_plugin.SelfDistillationPlugin"]}
    strategy = SDFTStrategy(tokenizer, cfg, {"path": "rows.jsonl"}, traces=False)
    prepared = strategy.tokenize_prompt({key: [row[key] for row in ROWS] for key in ROWS[0]})
    assert "sd_source_row" in prepared
    paper_ids = prepared["teacher_input_ids"][0]
    monkeypatch.setattr("sd_plugin.evaluation.greedy_answers", copy_for("copy"))
    trainer = SDFTTrainer(model=model, args=SDFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                                       teacher_template="auto", teacher_check_rows=4, max_steps=1),
                          train_dataset=Dataset.from_dict(prepared), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    assert trainer.teacher_template_chosen == "copy"
    record = sdft_record(ROWS[0])
    expected = render_ids(tokenizer, sdft_teacher_messages(record.messages, ROWS[0]["demonstration"], TEMPLATES["copy"]))
    assert trainer.train_dataset[0]["teacher_input_ids"] == expected != paper_ids
    assert trainer.train_dataset[0]["input_ids"] == prepared["input_ids"][0]


@pytest.mark.slow
def test_the_default_template_on_the_demo_task_warns_before_training(demo_model_dir, tmp_path, caplog):
    """The real case the warning is for: the quickstart's contact cards with the default `paper` template, whose
    teacher (the demo model with the card in context) writes prose, not the card (benchmarks/README.md: 0 of 8 rows;
    SDFT with it learns nothing). The check runs when the trainer is built, before any step."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    data = REPO / "example_configs" / "assets" / "data" / "contact_train.jsonl"
    args = SDFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                      save_strategy="no", use_cpu=True, seed=0, max_completion_length=32, max_prompt_length=256,
                      max_teacher_prompt_length=512, eval_verifier="sd_plugin.demo_task:ContactCardVerifier")
    assert args.teacher_template == "paper"
    with caplog.at_level(logging.WARNING, logger="sd_plugin"):
        SDFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(data), split="train"),
                    processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    warned = [r.getMessage() for r in caplog.records if "SDFT cannot teach it" in r.getMessage()
              and "checked rows" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("teacher template paper:"), warned
    assert "the eval_verifier passes 0% of 8 checked rows" in warned[0]
