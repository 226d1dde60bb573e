"""log_completions (prompts, rollouts, teacher contexts, rewards to the console and W&B), the metrics logged
once each, and no Axolotl `ppl` for these trainers."""

import io
import sys
import types
from collections import defaultdict

import pytest
from datasets import Dataset
from peft import LoraConfig
from test_sdft_trainer import LORA, make_args, rows
from test_sdpo import TEXTS, build_trainer
from test_sdzero import QWEN, answer_text, chemistry_rows, encode, fixed_rollouts, next_letter
from test_sdzero import make_args as sdzero_args

from sd_plugin import SDFTTrainer, SDZeroTrainer
from sd_plugin import completions_log as completions_module
from sd_plugin.testing import build_model


class FakeWandb(types.ModuleType):
    """Stands in for the `wandb` module (not installed here): records what is logged."""

    def __init__(self, run=True):
        super().__init__("wandb")
        self.run = object() if run else None
        self.logged = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    def log(self, values):
        self.logged.append(values)


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def report_to_wandb(trainer):
    # TrainingArguments(report_to="wandb") needs wandb installed for its callback; the table reads args only.
    trainer.args.report_to = ["wandb"]


def tables(module):
    return [entry["completions"] for entry in module.logged]


# ------------------------------------------------------------------ the three methods, end to end
def test_sdft_logs_prompt_rollout_and_demonstration_each_logging_step(tmp_path, tokenizer, quickstart_rows, fake_wandb, capsys):
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, log_completions=True, num_completions_to_print=1),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    report_to_wandb(trainer)
    sampled = []
    real_sample = SDFTTrainer.sample
    trainer.sample = lambda *a: sampled.append(real_sample(trainer, *a)) or sampled[-1]
    trainer.train()
    logged = tables(fake_wandb)
    assert len(logged) == 2  # max_steps=2, logging_steps=1
    demonstrations = {r["demonstration"].strip() for r in quickstart_rows[:4]}
    questions = [r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"] for r in quickstart_rows[:4]]
    for step, (table, rollouts) in enumerate(zip(logged, sampled), 1):
        assert table.columns == ["step", "prompt", "completion", "teacher_context"]
        assert len(table.data) == 2  # every row of the step's batch goes to W&B
        for row_index, (logged_step, prompt, completion, context) in enumerate(table.data):
            assert logged_step == step
            assert any(question in prompt for question in questions)
            ids = rollouts.completion_ids[row_index][rollouts.completion_mask[row_index].bool()].tolist()
            assert completion == completions_module.clean(tokenizer.decode(ids, skip_special_tokens=True))
            assert context.strip() in demonstrations
    printed = capsys.readouterr().out
    assert "Step 1" in printed and "Step 2" in printed and "teacher_context" in printed


def test_sdpo_logs_rewards_and_the_solution_or_feedback_the_teacher_saw(tmp_path, tokenizer, quickstart_rows, monkeypatch, fake_wandb):
    trainer = build_trainer(tmp_path, tokenizer, quickstart_rows, monkeypatch, log_completions=True)
    report_to_wandb(trainer)
    trainer.train()
    (table,) = tables(fake_wandb)
    assert table.columns == ["step", "prompt", "completion", "teacher_context", "reward"]
    by_completion = {row[2]: row for row in table.data}
    assert set(by_completion) == set(TEXTS)
    assert by_completion["wrong one"][3] == f"solution: {TEXTS[1]}\nfeedback: the unit is wrong"
    assert by_completion["wrong one"][4] == 0.0
    assert by_completion[TEXTS[1]][3] == "(none: no teacher signal)" and by_completion[TEXTS[1]][4] == 1.0
    assert by_completion["silent miss"][3] == f"solution: {TEXTS[1]}"
    assert by_completion["nothing"][3] == "(none: no teacher signal)"


def test_sdzero_logs_the_control_phrase_and_reward(tmp_path, tokenizer, monkeypatch, fake_wandb):
    right, wrong = chemistry_rows([1, 11])
    y_right = encode(tokenizer, answer_text(right["answer"], "One")) + [tokenizer.eos_token_id]
    y_wrong = encode(tokenizer, answer_text(next_letter(wrong["answer"]), "Another long")) + [tokenizer.eos_token_id]
    monkeypatch.setattr(SDZeroTrainer, "sample", fixed_rollouts(tokenizer, {right["prompt"]: y_right, wrong["prompt"]: y_wrong}))
    trainer = SDZeroTrainer(model=build_model("qwen3", tokenizer), args=sdzero_args(tmp_path, "distill", max_steps=1, log_completions=True),
                            train_dataset=Dataset.from_list([right, wrong]), processing_class=tokenizer)
    report_to_wandb(trainer)
    trainer.train()
    (table,) = tables(fake_wandb)
    contexts = {right["prompt"][-40:] in row[1]: (row[3], row[4]) for row in table.data}
    assert contexts[True] == (f"control phrase: {QWEN['correct']}", 1.0)
    assert contexts[False] == (f"control phrase: {QWEN['incorrect']}", 0.0)


def test_srt_phase_refuses_log_completions(tmp_path):
    with pytest.raises(ValueError, match="log_completions is only used with phase: distill"):
        sdzero_args(tmp_path, "srt", log_completions=True)


def test_off_by_default_and_no_table_without_a_wandb_run(tmp_path, tokenizer, quickstart_rows, monkeypatch, capsys):
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, max_steps=1),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer)
    trainer.train()
    assert trainer.completions_log is None and "teacher_context" not in capsys.readouterr().out
    module = FakeWandb(run=False)
    monkeypatch.setitem(sys.modules, "wandb", module)
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, max_steps=1, log_completions=True),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer)
    report_to_wandb(trainer)
    trainer.train()
    assert module.logged == [] and "teacher_context" in capsys.readouterr().out


def test_num_completions_to_print_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="num_completions_to_print must be >= 1"):
        make_args(tmp_path, num_completions_to_print=0)


# ------------------------------------------------------------------ formatting
def test_printed_sample_is_seeded_by_the_step_and_leaves_the_global_rng_alone():
    import random

    state = random.getstate()
    rows_ = list(range(10))
    first = completions_module.sample_rows(rows_, 3, step=7)
    assert len(first) == 3 and first == completions_module.sample_rows(rows_, 3, step=7)
    assert completions_module.sample_rows(rows_, None, step=7) == rows_
    assert random.getstate() == state


def test_model_output_cannot_drive_the_terminal_or_rich_markup():
    from rich.console import Console

    hostile = "[bold red]fake header[/bold red] \x1b[2J\x1b]0;title\x07 done\r"
    tokenizer = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: hostile)  # the rollout's text
    row = completions_module.CompletionRow(prompt_ids=[1], completion_ids=[2], teacher_context=hostile, reward=None)
    table = completions_module.completions_table(tokenizer, [row], step=1)
    buffer = io.StringIO()
    completions_module.print_completions(table["columns"], table["rows"], 1, Console(file=buffer, width=300, force_terminal=False))
    out = buffer.getvalue()
    assert out.count("[bold red]fake header[/bold red]") == 3  # prompt, completion, context: shown, not interpreted
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert all("\x1b" not in cell for cell in table["rows"][0][1:])  # nor sent to W&B


def test_plain_text_without_rich(monkeypatch, capsys):
    monkeypatch.setattr(completions_module, "rich_available", lambda: False)
    completions_module.print_completions(["step", "prompt", "completion", "teacher_context", "reward"],
                                         [[3, "What is 2+2?", "4", "feedback: ok", 1.0], [3, "Q2", "x" * 1000, "", None]], 3)
    out = capsys.readouterr().out
    assert out.startswith("completions at step 3 (2 shown)\n--- 1\nprompt: What is 2+2?\ncompletion: 4\n"
                          "teacher_context: feedback: ok\nreward: 1.00\n--- 2\n")
    assert f"completion: {'x' * 200} [... 600 characters ...] {'x' * 200}\n" in out


def test_long_cells_keep_head_and_tail():
    text = "a" * 50 + "MIDDLE" + "b" * 50
    cut = completions_module.excerpt(text, 20)
    assert cut.startswith("a" * 10) and cut.endswith("b" * 10) and "MIDDLE" not in cut and "[... 86 characters ...]" in cut
    assert completions_module.excerpt("short", 20) == "short"


# ------------------------------------------------------------------ metrics logged once
def test_sdft_logs_the_loss_once(tmp_path, tokenizer, quickstart_rows):
    """`loss` is the distillation loss: no other key repeats it (TRL's trainers log it twice more)."""
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, max_steps=1),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    logged = trainer.state.log_history[0]
    repeats = {"kl", "ce_loss", "distillation_loss", "self_distillation/distillation_loss", "ppl"}
    assert "loss" in logged and not repeats & set(logged)
    assert {"completions/mean_length", "completions/clipped_ratio"} <= set(logged)  # TRL's names
    assert not {"completion_length", "completion_truncated_fraction"} & set(logged)


def test_sdft_mixing_cross_entropy_rows_splits_the_loss_into_kl_and_ce_loss(tmp_path, tokenizer, quickstart_rows):
    trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, max_steps=4, lambda_on_policy=0.5),
                          train_dataset=rows(quickstart_rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    keys = set().union(*trainer.state.log_history[:-1])
    assert {"loss", "kl", "ce_loss"} <= keys


def test_axolotl_trainers_do_not_log_perplexity(monkeypatch):
    from axolotl.core.trainers.base import AxolotlTrainer
    from transformers import Trainer

    from sd_plugin.axolotl.trainers import TRAINERS

    emitted = []
    monkeypatch.setattr(Trainer, "log", lambda self, logs, start_time=None: emitted.append(dict(logs)))
    for make in TRAINERS.values():
        trainer = make().__new__(make())
        trainer._stored_metrics = defaultdict(dict)
        trainer.args = types.SimpleNamespace(include_tkps=False)
        AxolotlTrainer.log(trainer, {"loss": 0.5})  # the call our trainers' log ends in
        AxolotlTrainer.log(trainer, {"eval_loss": 0.5})
    assert emitted and all("ppl" not in logs and "eval_ppl" not in logs for logs in emitted)
    assert [logs.get("loss", logs.get("eval_loss")) for logs in emitted] == [0.5] * 6


def test_axolotl_yaml_accepts_the_options_in_every_method_block():
    from sd_plugin.axolotl.args import SelfDistillationArgs

    for trainer_type, block in (("sdft", {}), ("sdpo", {"verifier": "multiple_choice"}),
                                ("sdzero", {"phase": "distill", "verifier": "multiple_choice"})):
        parsed = SelfDistillationArgs.model_validate(
            {"trainer_type": trainer_type, trainer_type: {**block, "log_completions": True, "num_completions_to_print": 2}})
        assert getattr(parsed, trainer_type)["log_completions"] is True
        assert getattr(parsed, trainer_type)["num_completions_to_print"] == 2
