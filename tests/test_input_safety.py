"""No command destroys an input, through links and folders; a killed writer leaves no half-finished or mismatched
output; bad command lines end in one line and exit status 2 with nothing written (issue 25, sections 2 and 5)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sd_plugin.files as files
import sd_plugin.merge_inputs as merge_inputs
from sd_plugin.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "example_configs/assets/tiny-qwen3"


def write_lines(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def corpus_rows(count=6):
    return [{"template_id": f"t{i % 3}", "text": f"row number {i} says something", "reward": i / count} for i in range(count)]


def run(argv, capsys):
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sd-plugin {command}: "), err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def dead_pid() -> int:
    """The id of a process that has exited (a writer that was killed)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    return folder


# ------------------------------------------------------------------------------------ 2: inputs through links and folders
@pytest.mark.parametrize("command", ["generate", "collect-revisions"])
def test_an_attempts_log_hard_linked_to_the_prompts_is_refused_and_the_prompts_keep_every_line(command, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?", "answer": "6"}')  # no final newline
    os.link(prompts, tmp_path / "out.attempts.jsonl")
    before = prompts.read_bytes()
    option = "--prompts" if command == "generate" else "--problems"
    argv = [command, "--model", str(TINY), option, str(prompts), "--output", str(tmp_path / "out.jsonl"),
            "--verifier", "multiple_choice"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "attempts log" in one_error_line(err, command) and "is the input" in err
    assert prompts.read_bytes() == before
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["generate", "collect-revisions"])
@pytest.mark.parametrize("where", ["inside", "through a symlink"])
def test_an_output_inside_the_model_folder_is_refused(command, where, tmp_path, capsys):
    model = model_folder(tmp_path)
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    if where == "through a symlink":
        (tmp_path / "elsewhere").symlink_to(model, target_is_directory=True)
        output = tmp_path / "elsewhere" / "config.json"
    else:
        output = model / "tokenizer_config.json"
    before = snapshot(model)
    option = "--prompts" if command == "generate" else "--problems"
    argv = [command, "--model", str(model), option, prompts, "--output", str(output), "--verifier", "multiple_choice"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "inside the input folder --model" in one_error_line(err, command)
    assert snapshot(model) == before


def test_generate_refuses_an_output_inside_the_adapter_folder(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "2+2?"}])
    code, _, err = run(["generate", "--model", str(TINY), "--adapter", str(adapter), "--prompts", prompts,
                        "--output", str(adapter / "sub" / "out.jsonl")], capsys)
    assert code == 2 and "inside the input folder --adapter" in one_error_line(err, "generate")
    assert sorted(path.name for path in adapter.iterdir()) == ["adapter_config.json"]


def test_refuse_output_over_input_compares_files_not_names(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    os.link(data, tmp_path / "hard.jsonl")
    with pytest.raises(files.UsageError, match="is the input"):
        files.refuse_output_over_input({"--out": tmp_path / "hard.jsonl"}, [data])
    with pytest.raises(files.UsageError, match="same file"):
        files.refuse_output_over_input({"--out": data, "--summary": tmp_path / "hard.jsonl"}, [])
    files.refuse_output_over_input({"--out": tmp_path / "new.jsonl"}, [data])  # a new file is fine


# ------------------------------------------------------------------------------------ 2: merge --overwrite is never without --out
def interrupt_at(monkeypatch, step: int) -> list:
    """Make the `step`-th file-system operation of `move_into_place` (rename, exchange, delete) raise, as a kill
    there would stop the process: the operations before it happen, it and those after it do not."""
    calls = []

    def wrap(function):
        def wrapped(*args, **kwargs):
            calls.append(function.__name__)
            if len(calls) == step:
                raise KeyboardInterrupt(f"killed at {function.__name__}")
            return function(*args, **kwargs)
        wrapped.__name__ = function.__name__
        return wrapped

    for name in ("replace", "rename"):
        monkeypatch.setattr(merge_inputs.os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(merge_inputs.shutil, "rmtree", wrap(shutil.rmtree))
    monkeypatch.setattr(merge_inputs, "exchange_paths", wrap(merge_inputs.exchange_paths))
    return calls


def complete_output(folder: Path) -> str:
    """'old' or 'new' when `folder` holds one complete output, else a description of what is there."""
    if not folder.is_dir():
        return "no --out"
    names = sorted(path.name for path in folder.iterdir())
    version = (folder / "config.json").read_text() if (folder / "config.json").is_file() else None
    return version if names == ["config.json", "model.safetensors"] and version in ("old", "new") else f"broken: {names}"


def staged_output(out: Path) -> Path:
    staging = merge_inputs.staging_dir(out)
    (staging / "config.json").write_text("new")
    (staging / "model.safetensors").write_text("new weights")
    return staging


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic exchange", "two renames"])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_overwrite_killed_at_any_step_leaves_a_complete_out(step, exchange, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "model.safetensors").write_text("old weights")
    staging = staged_output(out)
    if not exchange:
        monkeypatch.setattr(merge_inputs, "exchange_paths", lambda first, second: False)
    interrupt_at(monkeypatch, step)
    try:
        merge_inputs.move_into_place(staging, out)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    if exchange:  # one atomic step: --out is complete at every moment
        assert complete_output(out) in ("old", "new")
    # The next run (its staging_dir) puts back an output a kill between two renames left aside, and removes the
    # leftovers of the killed run.
    # The next run is another process (id 1, alive); the killed one (this process) is gone.
    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(merge_inputs, "process_alive", lambda pid: pid == 1)
    monkeypatch.setattr(files, "process_alive", lambda pid: pid == 1)
    next_staging = merge_inputs.staging_dir(out)
    assert complete_output(out) in ("old", "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["out", next_staging.name])


def test_the_exchange_is_atomic_on_this_machine(tmp_path):
    """The atomic path is the one taken here (Linux renameat2 on the test file systems)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    if not merge_inputs.exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system cannot exchange two folders atomically")
    assert (tmp_path / "b" / "x").read_text() == "a" and not (tmp_path / "a" / "x").exists()


# ------------------------------------------------------------------------------------ 2: killed writers' temporaries
def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "out.jsonl"
    stale = tmp_path / f".out.jsonl{files.TEMPORARY_MARK}{dead_pid()}-abc123"
    stale.write_text('{"partial": ')
    stale.chmod(0o600)
    running = tmp_path / f".out.jsonl{files.TEMPORARY_MARK}{os.getpid()}-def456"  # a writer still at work
    running.write_text("in progress")
    files.write_text_atomic(out, "row\n")
    assert out.read_text() == "row\n"
    assert not stale.exists() and running.exists()


def test_a_killed_merge_leaves_no_staging_folder_after_the_next_run(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out{files.TEMPORARY_MARK}{dead_pid()}-partial-xyz"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_text("half")
    staging = merge_inputs.staging_dir(out)
    assert not stale.exists() and staging.is_dir()


def mix_argv(tmp_path, first, second):
    return ["mix", first, second, "--out", str(tmp_path / "mixed.jsonl"), "--summary", str(tmp_path / "summary.json"),
            "--mix-in-ratio", "0.5"]


@pytest.mark.parametrize("step", [1, 2])
def test_mix_killed_between_its_outputs_never_leaves_a_new_corpus_beside_an_old_summary(step, tmp_path, capsys, monkeypatch):
    first = write_lines(tmp_path / "r1.jsonl", corpus_rows())
    second = write_lines(tmp_path / "r2.jsonl", corpus_rows(9))
    earlier = write_lines(tmp_path / "r0.jsonl", corpus_rows(3))
    assert run(mix_argv(tmp_path, earlier, first), capsys)[0] == 0  # an earlier mix: its corpus and summary
    old_corpus = (tmp_path / "mixed.jsonl").read_bytes()
    calls = []
    real_replace = os.replace

    def killed_replace(source, target):
        calls.append(target)
        if len(calls) == step:
            raise KeyboardInterrupt("killed between the outputs")
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        cli_main(mix_argv(tmp_path, first, second))
    monkeypatch.undo()
    corpus = (tmp_path / "mixed.jsonl").read_bytes()
    summary_path = tmp_path / "summary.json"
    if corpus != old_corpus:
        assert not summary_path.exists()  # a new corpus: its summary is new or missing, never the old one
    if summary_path.exists():
        import hashlib

        assert json.loads(summary_path.read_text())["output"]["sha256"] == hashlib.sha256(corpus).hexdigest()
    # the next run completes the pair and leaves no temporary behind (the killed one was this process: alive)
    assert run(mix_argv(tmp_path, first, second), capsys)[0] == 0
    import hashlib

    summary = json.loads(summary_path.read_text())
    assert summary["output"]["sha256"] == hashlib.sha256((tmp_path / "mixed.jsonl").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ 5: the command line
def deeply_nested(size=200_000) -> str:
    depth = size // 2
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("command", ["stats", "mix", "collect-revisions", "generate"])
def test_a_200kb_deeply_nested_json_line_is_one_line_exit_2(command, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine", "text": "fine", "reward": 1}\n{"nested": ' + deeply_nested() + "}\n")
    good = write_lines(tmp_path / "good.jsonl", corpus_rows())
    out = tmp_path / "out.jsonl"
    argv = {"stats": ["stats", str(bad), "--json", str(out)],
            "mix": ["mix", good, str(bad), "--out", str(out)],
            "collect-revisions": ["collect-revisions", "--model", str(TINY), "--problems", str(bad), "--output", str(out),
                                  "--verifier", "multiple_choice"],
            "generate": ["generate", "--model", str(TINY), "--prompts", str(bad), "--output", str(out)]}[command]
    code, _, err = run(argv, capsys)
    if command == "mix":  # mix lists its malformed rows, then the one error line
        err = err.strip().splitlines()[-1]
    assert code == 2 and "bad.jsonl:2: JSON nested deeper than" in one_error_line(err, command)
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_deeply_nested_verifier_kwargs_are_a_usage_error(tmp_path, capsys):
    problems = write_lines(tmp_path / "problems.jsonl", [{"prompt": "2+2?"}])
    with pytest.raises(SystemExit) as exited:
        cli_main(["collect-revisions", "--model", str(TINY), "--problems", problems, "--output", str(tmp_path / "o.jsonl"),
                  "--verifier", "multiple_choice", "--verifier-kwargs", '{"a": ' + deeply_nested() + "}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "nested deeper than" in err and "Traceback" not in err
    assert len(err) < 2000  # the 200 KB argument is not echoed back


@pytest.mark.parametrize("case", ["mix --out", "stats --json", "eval-stats --json", "mix --summary"])
@pytest.mark.parametrize("problem", ["a folder", "under a file"])
def test_an_output_that_cannot_be_a_file_is_one_line_exit_2_and_nothing_written(case, problem, tmp_path, capsys):
    corpus = write_lines(tmp_path / "a.jsonl", corpus_rows())
    scored = write_lines(tmp_path / "scored.jsonl", [{"scenario_id": f"s{i}", "label": i % 2, "stage": "base", "reward": 0.5}
                                                      for i in range(4)])
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain.txt").write_text("a file")
    bad = str(tmp_path / "folder") if problem == "a folder" else str(tmp_path / "plain.txt" / "sub" / "out.json")
    argv = {"mix --out": ["mix", corpus, "--out", bad],
            "mix --summary": ["mix", corpus, "--out", str(tmp_path / "m.jsonl"), "--summary", bad],
            "stats --json": ["stats", corpus, "--json", bad],
            "eval-stats --json": ["eval-stats", scored, "--bootstrap", "0", "--json", bad]}[case]
    before = snapshot(tmp_path)
    code, out, err = run(argv, capsys)
    line = one_error_line(err, argv[0])
    assert code == 2 and ("is a folder" in line if problem == "a folder" else "cannot create" in line)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "folder", "plain.txt",
                                                                                          "scored.jsonl"]


@pytest.mark.parametrize("command", ["generate", "collect-revisions"])
def test_a_model_that_does_not_exist_is_one_line_exit_2(command, tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    option = "--prompts" if command == "generate" else "--problems"
    code, _, err = run([command, "--model", "/nonexistent", option, prompts, "--output", str(tmp_path / "o.jsonl"),
                        "--verifier", "multiple_choice"], capsys)
    assert code == 2 and "--model /nonexistent: no such folder" in one_error_line(err, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_stats_plot_without_matplotlib_writes_nothing(tmp_path, capsys, monkeypatch):
    corpus = write_lines(tmp_path / "a.jsonl", corpus_rows())
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, _, err = run(["stats", corpus, "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "needs matplotlib" in one_error_line(err, "stats")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def fake_adapter(tmp_path: Path) -> Path:
    """An adapter folder as far as the input checks read it (nothing here is merged)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(TINY),
                                                             "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return adapter


@pytest.mark.parametrize("where", ["inside the adapter", "under a file"])
def test_merge_refuses_an_out_it_cannot_or_must_not_create_before_any_work(where, tmp_path, capsys):
    adapter = fake_adapter(tmp_path)
    (tmp_path / "plain.txt").write_text("a file")
    out = adapter / "merged" if where == "inside the adapter" else tmp_path / "plain.txt" / "merged"
    before = snapshot(tmp_path)
    code, _, err = run(["merge", "--adapter", str(adapter), "--base", str(TINY), "--out", str(out), "--method", "sdft"],
                       capsys)
    line = one_error_line(err, "merge")
    assert code == 2 and ("inside the input folder --adapter" in line if where == "inside the adapter" else "cannot create" in line)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "plain.txt"]
