"""Conventions shared by the data commands (stats, eval-stats, mix, plan, collect-revisions): bad input is one line
`sd-plugin CMD: file[:line]: reason` on stderr with exit status 2, named fields must exist, an output is never
one of the inputs (unless --force), and every written file is complete, fsynced and has the umask's mode."""

import json
import os
import stat
from pathlib import Path

import pytest

import sd_plugin
import sd_plugin.files as files
from sd_plugin.cli import main as cli_main
from sd_plugin.rows import PromptRow

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "example_configs" / "assets" / "data"
SDFT_RECORDS = DATA / "quickstart_sdft.jsonl"  # the project's own SDFT records: prompt + demonstration


def write_lines(path: Path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def corpus_rows(count=6):
    return [{"template_id": f"t{i % 3}", "reward": 0.5, "completion": f"answer {i} is here"} for i in range(count)]


def scored_rows():
    return [{"scenario_id": f"s{i}", "label": "good" if i % 2 else "bad", "reward": i / 4} for i in range(4)]


def collect_argv(problems, output, verifier="multiple_choice", *extra):
    # --model is never loaded in these tests: every refusal happens before the model loads (it must exist)
    return ["collect-revisions", "--model", str(REPO / "example_configs/assets/tiny-qwen3"), "--problems", str(problems), "--output", str(output),
            "--verifier", verifier, *extra]


def run(argv, capsys):
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sd-plugin {command}: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------ 16.5: bad input, exit 2
def commands_reading(path: str, tmp_path: Path) -> dict[str, list[str]]:
    """Each command with `path` as the file it reads."""
    good = write_lines(tmp_path / "good.jsonl", corpus_rows())
    return {
        "stats": ["stats", path],
        "eval-stats": ["eval-stats", path, "--bootstrap", "0"],
        "mix": ["mix", good, path, "--out", str(tmp_path / "mixed.jsonl")],
        "plan": ["plan", path],
        "collect-revisions": collect_argv(path, tmp_path / "revisions.jsonl"),
    }


@pytest.mark.parametrize("command", ["stats", "eval-stats", "mix", "plan", "collect-revisions"])
def test_a_missing_file_is_one_line_naming_it_with_exit_2(command, tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    code, _, err = run(commands_reading(missing, tmp_path)[command], capsys)
    assert code == 2
    assert one_error_line(err, command).endswith(f"{missing}: no such file") or f"{missing}: no such file" in err


@pytest.mark.parametrize("command", ["stats", "eval-stats", "mix", "collect-revisions"])
def test_a_malformed_jsonl_line_is_refused_naming_file_and_line(command, tmp_path, capsys):
    rows = scored_rows() if command == "eval-stats" else [{"prompt": "What is 2+2?", "answer": "4", "reward": 1.0,
                                                            "completion": "four", "template_id": "t"}]
    path = write_lines(tmp_path / "bad.jsonl", rows + ['{"prompt": "unterminated'])
    code, out, err = run(commands_reading(path, tmp_path)[command], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"sd-plugin {command}: {path}:{len(rows) + 1}: invalid JSON" in err.splitlines()[-1]
    assert not (tmp_path / "mixed.jsonl").exists() and not (tmp_path / "revisions.jsonl").exists()


def test_a_byte_order_mark_and_crlf_line_ends_are_not_malformed_lines(tmp_path, capsys):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(row).encode() + b"\r\n" for row in corpus_rows()))
    code, out, err = run(["stats", str(path)], capsys)
    assert code == 0 and err == ""
    assert [line.split()[-1] for line in out.splitlines() if line.startswith(("rows", "unique groups"))] == ["6", "3"]


def test_plan_names_the_line_of_invalid_yaml(tmp_path, capsys):
    path = tmp_path / "config.yml"
    path.write_text("base_model: tiny\nsdft: [unclosed\nmicro_batch_size: 1\n")
    code, _, err = run(["plan", str(path)], capsys)
    assert code == 2
    assert one_error_line(err, "plan").startswith(f"sd-plugin plan: {path}:3: invalid YAML")


def test_plan_of_an_unknown_model_is_bad_input(tmp_path, capsys):
    path = tmp_path / "config.yml"
    path.write_text("base_model: no-such-model\ntrainer_type: sdft\n")
    code, _, err = run(["plan", str(path)], capsys)
    assert code == 2 and "unknown model 'no-such-model'" in one_error_line(err, "plan")


def test_an_unknown_verifier_is_refused_before_the_model_loads(tmp_path, capsys):
    problems = write_lines(tmp_path / "problems.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    code, _, err = run(collect_argv(problems, tmp_path / "out.jsonl", "multiple_choise"), capsys)
    assert code == 2
    assert "Unknown verifier 'multiple_choise'" in one_error_line(err, "collect-revisions")


def test_a_problem_row_that_is_not_a_prompt_is_refused_naming_its_line(tmp_path, capsys):
    problems = write_lines(tmp_path / "problems.jsonl", [{"prompt": "2+2?"}, {"question": "no prompt"}])
    code, _, err = run(collect_argv(problems, tmp_path / "out.jsonl"), capsys)
    assert code == 2
    assert one_error_line(err, "collect-revisions").startswith(
        f"sd-plugin collect-revisions: {problems}:2: missing column 'prompt'")


def test_verifier_kwargs_must_be_a_json_object(tmp_path, capsys):
    problems = write_lines(tmp_path / "problems.jsonl", [{"prompt": "2+2?"}])
    with pytest.raises(SystemExit) as exited:
        cli_main(collect_argv(problems, tmp_path / "out.jsonl", "multiple_choice", "--verifier-kwargs", "[1]"))
    assert exited.value.code == 2
    assert "expected a JSON object, got list" in capsys.readouterr().err


def test_stats_and_mix_treat_a_malformed_line_alike(tmp_path, capsys):
    """Both refuse it (stats used to skip it with exit 0 while mix refused)."""
    path = write_lines(tmp_path / "corpus.jsonl", corpus_rows() + ["not json"])
    stats_code, _, stats_err = run(["stats", path], capsys)
    mix_code, _, mix_err = run(["mix", path, "--out", str(tmp_path / "m.jsonl")], capsys)
    assert stats_code == mix_code == 2
    assert f"{path}:7: invalid JSON" in stats_err and f"{path}:7: invalid JSON" in mix_err


def test_skipped_rows_are_summarised_in_a_few_lines(tmp_path, capsys):
    path = write_lines(tmp_path / "corpus.jsonl", corpus_rows() + [f"broken {i}" for i in range(12)])
    code, _, err = run(["mix", path, "--out", str(tmp_path / "m.jsonl"), "--skip-invalid", "--mix-in-ratio", "0"],
                       capsys)
    assert code == 0
    listed = [line for line in err.splitlines() if line.startswith(f"  {path}:")]
    assert len(listed) == files.SHOWN_ERRORS and "  ... and 7 more" in err.splitlines()


def test_version(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sd-plugin {sd_plugin.__version__}"


@pytest.mark.parametrize("argv,shown", [
    (["stats"], ["--dedup-threshold DEDUP_THRESHOLD", "(default: 0.8)"]),
    (["eval-stats"], ["(default: 1000)", "(default: scenario)"]),
    (["mix"], ["(default: 0.5)", "(default: reward)", "(default: 0.8)"]),
    (["plan"], ["(default: 80GB)"]),
    (["collect-revisions"], ["(default: 4096)", "(default: qwen)"]),
])
def test_help_shows_the_defaults(argv, shown, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main([*argv, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith(f"usage: sd-plugin {argv[0]} ")
    for fragment in shown:
        assert fragment in text
    assert "(default: None)" not in text and "(default: False)" not in text


# ------------------------------------------------------------------------- 16.6: fields that change results
@pytest.mark.parametrize("option,value", [("--text-field", "complet"), ("--group-field", "templateid")])
@pytest.mark.parametrize("command", ["stats", "mix"])
def test_a_named_field_that_no_row_has_is_refused(command, option, value, tmp_path, capsys):
    path = write_lines(tmp_path / "corpus.jsonl", corpus_rows())
    argv = ["stats", path] if command == "stats" else ["mix", path, "--out", str(tmp_path / "m.jsonl")]
    code, _, err = run([*argv, option, value], capsys)
    assert code == 2
    assert f"no row has field {value!r}" in one_error_line(err, command)
    assert "completion, reward, template_id" in err  # the fields there are
    assert not (tmp_path / "m.jsonl").exists()


def test_without_a_group_field_mix_and_stats_still_cluster_by_text(tmp_path, capsys):
    rows = [{"reward": 1.0, "completion": f"answer {i} is here"} for i in range(6)]
    path = write_lines(tmp_path / "corpus.jsonl", rows)
    assert run(["stats", path], capsys)[1].count("near-duplicate clusters") == 1
    assert run(["mix", path, "--out", str(tmp_path / "m.jsonl")], capsys)[0] == 0


def test_stats_recognises_the_projects_sdft_records(tmp_path, capsys):
    code, out, _ = run(["stats", str(SDFT_RECORDS), "--json", str(tmp_path / "s.json")], capsys)
    assert code == 0
    corpus = json.loads((tmp_path / "s.json").read_text())["corpora"][0]
    assert corpus["distinct_1"] is not None and corpus["distinct_2"] is not None
    assert corpus["near_dup_rate"] is not None
    distinct_line = next(line for line in out.splitlines() if line.startswith("distinct-1"))
    assert not distinct_line.rstrip().endswith("-")


def test_row_text_knows_demonstrations_revisions_and_completions():
    from sd_plugin.stats import row_text

    assert row_text({"prompt": "p", "demonstration": "the answer"}) == "the answer"
    assert row_text({"prompt": "p", "demonstration": {"role": "assistant", "content": "as a message"}}) == "as a message"
    assert row_text({"prompt": "p", "y_init": "first", "y_revised": "revised"}) == "revised"
    assert row_text({"prompt": "p", "completion": "sampled"}) == "sampled"
    assert row_text({"prompt": "only a prompt"}) is None


# --------------------------------------------------------------------------- 20.9: outputs never destroy inputs
def test_collect_revisions_refuses_to_write_over_its_problems(tmp_path, capsys):
    problems = tmp_path / "problems.jsonl"
    write_lines(problems, [{"prompt": "2+2?", "answer": "4"}])
    before = problems.read_bytes()
    code, _, err = run(collect_argv(problems, problems), capsys)
    assert code == 2 and "--output" in one_error_line(err, "collect-revisions")
    assert problems.read_bytes() == before


@pytest.mark.parametrize("case", ["mix --out", "mix --summary", "mix --rejects", "stats --json", "stats --plot",
                                  "eval-stats --json", "mix --out (other spelling)"])
def test_an_output_that_is_an_input_is_refused(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = write_lines(tmp_path / "a.jsonl", corpus_rows())
    second = write_lines(tmp_path / "b.jsonl", corpus_rows())
    scored = write_lines(tmp_path / "scored.jsonl", scored_rows())
    argv = {
        "mix --out": ["mix", first, second, "--out", first],
        "mix --summary": ["mix", first, second, "--out", "m.jsonl", "--summary", second],
        "mix --rejects": ["mix", first, second, "--out", "m.jsonl", "--skip-invalid", "--rejects", first],
        "stats --json": ["stats", first, "--json", first],
        "stats --plot": ["stats", first, second, "--plot", second],
        "eval-stats --json": ["eval-stats", scored, "--bootstrap", "0", "--json", scored],
        "mix --out (other spelling)": ["mix", "a.jsonl", second, "--out", f"{tmp_path}/./sub/../a.jsonl"],
    }[case]
    (tmp_path / "sub").mkdir()
    inputs = {path: Path(path).read_bytes() for path in (first, second, scored)}
    code, _, err = run(argv, capsys)
    assert code == 2 and "writing it would destroy the input" in one_error_line(err, argv[0])
    assert all(Path(path).read_bytes() == content for path, content in inputs.items())
    assert not (tmp_path / "m.jsonl").exists()


def test_an_output_through_a_symlink_to_an_input_is_refused(tmp_path, capsys):
    first = write_lines(tmp_path / "a.jsonl", corpus_rows())
    (tmp_path / "link.jsonl").symlink_to(first)
    code, _, err = run(["stats", first, "--json", str(tmp_path / "link.jsonl")], capsys)
    assert code == 2 and Path(first).read_text().startswith('{"template_id"')


def test_force_allows_writing_over_an_input(tmp_path, capsys):
    first = write_lines(tmp_path / "a.jsonl", corpus_rows())
    assert run(["mix", first, "--out", first, "--force", "--mix-in-ratio", "0"], capsys)[0] == 0
    assert all("_provenance" in json.loads(line) for line in Path(first).read_text().splitlines())


def test_two_outputs_on_one_file_are_refused(tmp_path, capsys):
    first = write_lines(tmp_path / "a.jsonl", corpus_rows())
    out = str(tmp_path / "m.jsonl")
    code, _, err = run(["mix", first, "--out", out, "--summary", out], capsys)
    assert code == 2 and "is the same file as --out" in one_error_line(err, "mix")


def test_round2_mixer_block_refuses_an_output_that_is_an_input(tmp_path):
    from sd_plugin.mixer import mix_from_config

    first = write_lines(tmp_path / "a.jsonl", corpus_rows())
    before = Path(first).read_bytes()
    with pytest.raises(ValueError, match="round2_mixer.output_path .* is the input"):
        mix_from_config({"inputs": [first], "output_path": first})
    assert Path(first).read_bytes() == before


# --------------------------------------------------------------------------------------------- atomic writes
@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_write_gives_a_new_file_the_umasks_mode(tmp_path, umask_022, capsys):
    files.write_text_atomic(tmp_path / "new.txt", "x\n")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644
    first = write_lines(tmp_path / "a.jsonl", corpus_rows())
    assert cli_main(["mix", first, "--out", str(tmp_path / "m.jsonl"), "--summary", str(tmp_path / "s.json")]) == 0
    assert cli_main(["stats", first, "--json", str(tmp_path / "stats.json"), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("m.jsonl", "s.json", "stats.json", "p.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask_022):
    path = tmp_path / "shared.jsonl"
    path.write_text("old\n")
    path.chmod(0o664)
    files.write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o664


def test_atomic_write_fsyncs_the_data_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda *a: (events.append("replace"), real_replace(*a))[1])
    files.write_text_atomic(tmp_path / "out.jsonl", "row\n")
    assert events[:2] == ["fsync", "replace"]
    assert (tmp_path / "out.jsonl").read_text() == "row\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")

    def failing_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        files.write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_every_command_writes_through_the_one_atomic_helper():
    import sd_plugin.mixer as mixer
    import sd_plugin.revisions as revisions
    import sd_plugin.stats as stats

    assert mixer.write_text_atomic is stats.write_text_atomic is revisions.write_text_atomic is files.write_text_atomic


def test_collected_revisions_are_written_atomically_with_the_umasks_mode(tmp_path, umask_022, monkeypatch):
    import sd_plugin.revisions as revisions

    calls = []
    monkeypatch.setattr(revisions, "write_text_atomic",
                        lambda path, text: (calls.append(path), files.write_text_atomic(path, text))[1])
    problem = PromptRow(0, 1, {"prompt": "2+2?"}, {}, [1, 2], "f")
    attempt = {"kept": ["4"], "y_init": "5", "initially_correct": False, "control_phrase": "Wait"}
    output = tmp_path / "revisions.jsonl"
    assert revisions._write_output(output, [problem], {0: attempt}, None) == 1
    assert calls == [output] and stat.S_IMODE(output.stat().st_mode) == 0o644
    assert json.loads(output.read_text())["y_revised"] == "4"


# ------------------------------------------------------------------------- renamed flags
class _LoadedModel:
    def to(self, device):
        return self


@pytest.fixture
def collect_without_a_model(monkeypatch):
    """collect-revisions up to the collection: the options it would collect with, no model loaded."""
    import transformers

    import sd_plugin.revisions as revisions

    used = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: _LoadedModel())
    monkeypatch.setattr(revisions, "collect_revisions",
                        lambda model, tokenizer, problems, output, options, **kwargs: used.append(options) or
                        revisions.CollectionSummary(0, 0, 0, 0, str(output)))
    return used


@pytest.mark.parametrize("flags,threshold", [([], 1.0), (["--success-reward-threshold", "0.5"], 0.5)])
def test_collect_revisions_takes_the_success_reward_threshold(flags, threshold, tmp_path, collect_without_a_model, recwarn):
    problems = write_lines(tmp_path / "problems.jsonl", [{"prompt": "Which? A or B", "answer": "A"}])
    assert cli_main(collect_argv(problems, tmp_path / "revisions.jsonl", "multiple_choice", *flags)) == 0
    assert collect_without_a_model[0].success_reward_threshold == threshold
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_collect_revisions_old_threshold_flag_still_works_with_a_warning(tmp_path, collect_without_a_model):
    problems = write_lines(tmp_path / "problems.jsonl", [{"prompt": "Which? A or B", "answer": "A"}])
    argv = collect_argv(problems, tmp_path / "revisions.jsonl", "multiple_choice", "--success-threshold", "0.5")
    with pytest.warns(FutureWarning, match="--success-threshold is deprecated: use --success-reward-threshold"):
        assert cli_main(argv) == 0
    assert collect_without_a_model[0].success_reward_threshold == 0.5


def test_collect_revisions_refuses_the_old_and_new_threshold_flags_together(tmp_path, capsys, collect_without_a_model):
    problems = write_lines(tmp_path / "problems.jsonl", [{"prompt": "Which? A or B", "answer": "A"}])
    argv = collect_argv(problems, tmp_path / "revisions.jsonl", "multiple_choice",
                        "--success-threshold", "0.5", "--success-reward-threshold", "0.7")
    code, _, err = run(argv, capsys)
    assert code == 2 and "--success-threshold and --success-reward-threshold are both set" in one_error_line(err, "collect-revisions")
    assert not collect_without_a_model
