"""Your own data: Axolotl's own dataset strategies are refused early with the strategy to use, and the README's
"Use your own data" rows are what the built-in verifiers read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_plugin.axolotl.args import SelfDistillationArgs

REPO = Path(__file__).resolve().parents[1]
SDPO = {"verifier": "multiple_choice"}


def config(method: str, *entries: dict, **block) -> dict:
    return {"trainer_type": method, method: block or None, "datasets": list(entries)}


@pytest.mark.parametrize("method,block,entry,advice", [
    ("sdft", {}, {"path": "chats.jsonl", "type": "chat_template"}, "type: sd_plugin.axolotl.strategies.trace"),
    ("sdft", {}, {"path": "chats.jsonl", "type": "chat_template", "field_messages": "conversations"},
     "strategies.trace, field_messages: conversations"),
    ("sdft", {}, {"path": "chats.jsonl", "type": "chat_template.default"}, "strategies.trace"),
    ("sdft", {}, {"path": "instr.jsonl", "type": "alpaca"}, "strategies.sdft"),
    ("sdft", {}, {"path": "rows.jsonl"}, "no type"),
    ("sdpo", SDPO, {"path": "chats.jsonl", "type": "chat_template"}, "type: sd_plugin.axolotl.strategies.prompts"),
    ("sdzero", {"phase": "srt"}, {"path": "chats.jsonl", "type": "chat_template"}, "strategies.sdzero"),
])
def test_axolotl_strategies_are_refused_before_the_model_loads_naming_ours(method, block, entry, advice):
    with pytest.raises(ValueError, match="datasets\\[0\\] .* one of Axolotl's own strategies") as refused:
        SelfDistillationArgs.model_validate(config(method, entry, **block))
    assert advice in str(refused.value) and entry["path"] in str(refused.value)


def test_our_strategies_and_a_users_module_pass():
    ours = [{"path": "a.jsonl", "type": f"sd_plugin.axolotl.strategies.{name}"} for name in ("sdft", "trace")]
    SelfDistillationArgs.model_validate(config("sdft", *ours, {"path": "b.jsonl", "type": "my_project.strategy"}))
    SelfDistillationArgs.model_validate({"datasets": [{"path": "c.jsonl", "type": "chat_template"}]})  # plugin inert
    with pytest.raises(ValueError, match="test_datasets\\[0\\]"):
        SelfDistillationArgs.model_validate({**config("sdft", *ours), "test_datasets": [{"path": "t", "type": "chat_template"}]})


def test_rows_tokenized_by_a_host_strategy_are_refused_by_the_trainer(tmp_path, tokenizer):
    from datasets import Dataset

    from sd_plugin import SDFTConfig, SDFTTrainer
    from sd_plugin.testing import build_model

    host_rows = Dataset.from_list([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]}] * 4)
    args = SDFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="already tokenized .* sd_plugin.axolotl.strategies.trace for chat rows"):
        SDFTTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=host_rows, processing_class=tokenizer)


def test_chat_rows_given_as_sdft_records_are_not_told_to_skip_every_row(tmp_path, tokenizer):
    from datasets import Dataset

    from sd_plugin import SDFTConfig, SDFTTrainer
    from sd_plugin.testing import build_model

    chats = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3)
    args = SDFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="all 3 rows are invalid .*missing column 'prompt'.* not in this trainer's row format") as refused:
        SDFTTrainer(model=build_model("qwen3", tokenizer), args=args, train_dataset=chats, processing_class=tokenizer)
    assert "skip_invalid" not in str(refused.value)


def readme_verifier_rows() -> list[tuple[str, dict, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use your own data", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `") or "example row" in line:
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if len(cells) == 4 and cells[2].startswith("`{"):
            rows.append((cells[0].strip("`"), json.loads(cells[2].strip("`")), cells[3].strip("`")))
    return rows


def test_readme_has_one_example_row_per_builtin_verifier():
    from sd_plugin.verifiers import BUILTIN_VERIFIERS

    names = [name for name, _, _ in readme_verifier_rows()]
    assert sorted(names) == sorted(set(BUILTIN_VERIFIERS) - {"tool_call"})  # tool_call: the old alias


@pytest.mark.parametrize("name,row,completion", readme_verifier_rows(), ids=lambda value: value if isinstance(value, str) and len(value) < 20 else None)
def test_readme_example_rows_score_their_completion_1(name, row, completion):
    from sd_plugin.data import prompt_record
    from sd_plugin.verifiers import SandboxUnavailable, load_verifier

    record = prompt_record(row)  # the record a verifier gets in training (strategies.prompts / SDPOTrainer)
    verifier = load_verifier(name, {"timeout": 10} if name == "python_tests" else None)
    try:
        reward, feedback = verifier(record["messages"], completion, record)
    except SandboxUnavailable as error:
        pytest.skip(f"no sandbox here: {error}")
    assert reward == 1.0, feedback
    reward, _ = verifier(record["messages"], "I do not know.", record)
    assert reward == 0.0


def test_readme_troubleshooting_points_at_check_teacher():
    text = (REPO / "README.md").read_text()
    section = text.split("## Use your own data", 1)[1].split("\n## ", 1)[0]
    for topic in ("No plugin", "Every row is invalid", "No signal", "A template the teacher cannot follow", "Greedy vs sampled"):
        assert f"**{topic}" in section, topic
    assert "sd-plugin check-teacher" in section
