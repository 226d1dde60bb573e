"""The README as a user reads it: a table of contents that matches its sections, and a Python snippet that is the
real quickstart (it runs, evaluates before and after, and saves the adapter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_table_of_contents_lists_every_section_in_order():
    contents = README.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^- \[(.+)\]\(#(.+)\)$", contents, re.M)
    headings = [line[3:] for line in README.splitlines() if line.startswith("## ") and line != "## Contents"]
    assert [title for title, _ in entries] == headings
    assert all(target == anchor(title) for title, target in entries)


def python_snippet() -> str:
    section = README.split("## Python API (no Axolotl)", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_python_snippet_is_the_quickstart_and_runs(demo_model_dir, tmp_path, monkeypatch, capsys):
    """The snippet as printed, with the demo model from the test cache, 2 steps, a temporary output folder and the
    first 4 rows of each held-out set (the full sets are the quickstart's, scored in tests/test_learning.py)."""
    code = python_snippet()
    for setting in ('"outputs/SmolLM2-135M-Instruct"', '"example_configs/assets/data"', "max_steps=16",
                    'output_dir="outputs/quickstart-python"', "trainer.save_model()"):
        assert setting in code, setting
    data = tmp_path / "data"
    data.mkdir()
    for name in ("contact_train.jsonl", "contact_test.jsonl", "capitals_test.jsonl"):
        lines = (REPO / "example_configs" / "assets" / "data" / name).read_text().splitlines(keepends=True)
        (data / name).write_text("".join(lines if name.endswith("_train.jsonl") else lines[:4]))
    code = (code.replace('"outputs/SmolLM2-135M-Instruct"', repr(str(demo_model_dir)))
                .replace('"example_configs/assets/data"', repr(str(data)))
                .replace("max_steps=16", "max_steps=2")
                .replace('output_dir="outputs/quickstart-python"', f"output_dir={str(tmp_path / 'run')!r}"))
    monkeypatch.chdir(REPO)
    exec(compile(code, "README.md (Python API)", "exec"), {})
    printed = capsys.readouterr().out
    assert "Held-out evaluation: step 0 -> step 2 (greedy; sampled: 1 per prompt" in printed
    assert "task" in printed and "prior" in printed
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "training_config.json").is_file()
