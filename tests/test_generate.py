"""`sd-plugin generate`: sampling options honoured, provenance on every row, resume after a SIGKILL, bad input
refused with FILE:LINE before any generation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sd_plugin import cli, generate
from sd_plugin.generate import GenerateOptions, generate_corpus
from sd_plugin.revisions import attempts_path
from sd_plugin.testing import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "example_configs" / "assets" / "tiny-qwen3"


def prompt_rows(n):
    return [{"id": f"p{i}", "template_id": f"tpl-{i % 3}", "prompt": f"Name chemical element number {i}.", "answer": "A"}
            for i in range(n)]


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)


def length_reward(prompt, completion, record):
    return len(completion) / 100.0, f"{len(completion)} characters for {record['id']}"


def run(model, tokenizer, prompts, output, **overrides):
    options = GenerateOptions(**{"num_samples": 2, "max_new_tokens": 8, "batch_size": 2, **overrides})
    return generate_corpus(model, tokenizer, prompts, output, options, model_name="tiny", progress=False)


def greedy_continuation(model, tokenizer, prompt, steps):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    ids = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_top_k_1_gives_the_greedy_continuation_and_the_token_cap_holds(tmp_path, tiny_model, tokenizer):
    rows = prompt_rows(3)
    run(tiny_model, tokenizer, rows, tmp_path / "greedy.jsonl", top_k=1, max_new_tokens=6, num_samples=3)
    out = read_jsonl(tmp_path / "greedy.jsonl")
    assert len(out) == 9
    for row in out:
        expected = greedy_continuation(tiny_model, tokenizer, row["prompt"], 6)
        assert row["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert row["completion_tokens"] == len(expected) <= 6


def test_sampling_options_reach_generate_and_the_checkpoint_defaults_do_not(tmp_path, tiny_model, tokenizer, monkeypatch):
    seen = []
    real = generate.generate_rollouts

    def spy(model, prompt_ids, prompt_mask, options, eos_token_ids, pad_token_id):
        seen.append(options)
        return real(model, prompt_ids, prompt_mask, options, eos_token_ids, pad_token_id)

    monkeypatch.setattr(generate, "generate_rollouts", spy)
    # A checkpoint asking for greedy, 2-token decoding must not change what the options say.
    config = tiny_model.generation_config
    saved = (config.do_sample, config.top_k, config.max_new_tokens)
    config.do_sample, config.top_k, config.max_new_tokens = False, 1, 2
    try:
        run(tiny_model, tokenizer, prompt_rows(2), tmp_path / "sampled.jsonl", temperature=1.5, top_p=0.9,
            max_new_tokens=12, num_samples=4, batch_size=2)
    finally:
        config.do_sample, config.top_k, config.max_new_tokens = saved
    assert [(o.temperature, o.top_p, o.top_k, o.max_new_tokens, o.num_generations) for o in seen] == [(1.5, 0.9, None, 12, 4)]
    out = read_jsonl(tmp_path / "sampled.jsonl")
    assert max(row["completion_tokens"] for row in out) > 2
    assert len({row["completion"] for row in out if row["prompt_id"] == "p0"}) > 1  # sampled, not greedy


def test_the_seed_fixes_the_samples(tmp_path, tiny_model, tokenizer):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(tiny_model, tokenizer, prompt_rows(2), tmp_path / f"{name}.jsonl", seed=seed, max_new_tokens=10)
    texts = {name: [row["completion"] for row in read_jsonl(tmp_path / f"{name}.jsonl")] for name in "abc"}
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["c"]


def test_every_row_carries_its_provenance_and_the_verifier_score(tmp_path, tiny_model, tokenizer):
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_rows(3))
    summary = generate_corpus(
        tiny_model, tokenizer, prompts, tmp_path / "out.jsonl",
        GenerateOptions(num_samples=2, max_new_tokens=5, temperature=0.7, top_p=0.95, top_k=20, seed=3, batch_size=2,
                        verifier=length_reward, round_label="r2"),
        model_name="models/base", adapter="outputs/r1", progress=False)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert summary.rows == len(out) == 6
    assert [(row["prompt_id"], row["sample_index"]) for row in out] == [(f"p{i}", k) for i in range(3) for k in range(2)]
    for row in out:
        i = int(row["prompt_id"][1:])
        assert row["template_id"] == f"tpl-{i % 3}" and row["answer"] == "A"  # the prompt row's own columns
        assert row["round"] == "r2"
        assert row["reward"] == pytest.approx(len(row["completion"]) / 100.0)
        assert row["feedback"] == f"{len(row['completion'])} characters for p{i}"
        assert row["provenance"] == {
            "model": "models/base", "adapter": "outputs/r1", "round": "r2",
            "sampling": {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "max_new_tokens": 5, "num_samples": 2, "seed": 3},
            "verifier": repr(length_reward), "prompt_file": str(prompts), "source_row": i, "line": i + 1,
            "prompt_id": f"p{i}", "group_id": f"tpl-{i % 3}",
        }


def test_rows_without_id_or_group_use_the_row_index_and_no_group(tmp_path, tiny_model, tokenizer):
    run(tiny_model, tokenizer, [{"prompt": "Hello"}, {"prompt": "Bye"}], tmp_path / "out.jsonl", num_samples=1)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [(row["prompt_id"], row["provenance"]["group_id"]) for row in out] == [(0, None), (1, None)]
    assert "reward" not in out[0]  # no verifier, no score


def cli_args(prompts, output, *extra):
    return ["generate", "--model", str(TINY), "--prompts", str(prompts), "--output", str(output),
            "--num-samples", "2", "--max-new-tokens", "24", "--batch-size", "1", "--no-progress", *extra]


@pytest.mark.slow  # three CLI subprocesses, ~35 s
def test_resume_after_sigkill_completes_without_duplicates_and_matches_an_uninterrupted_run(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_rows(40))
    output = tmp_path / "killed.jsonl"
    log = attempts_path(output)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from sd_plugin.cli import main; sys.exit(main(sys.argv[1:]))"]
    process = subprocess.Popen(command + cli_args(prompts, output, "--verifier", "multiple_choice"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or log.read_bytes().count(b"\n") < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = log.read_bytes().count(b"\n")
    assert 3 <= done_at_kill < 40, "the kill must land mid-run"
    assert not output.exists()  # the corpus is written from the log at the end only
    with open(log, "ab") as handle:  # what a kill in the middle of a write leaves behind
        handle.write(b'{"source_row": 39, "fingerprint": "cut')

    resumed = subprocess.run(command + cli_args(prompts, output, "--verifier", "multiple_choice"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{(40 - done_at_kill) * 2} samples generated now" in resumed.stdout
    fresh = tmp_path / "fresh.jsonl"
    subprocess.run(command + cli_args(prompts, fresh, "--verifier", "multiple_choice"), env=env, check=True,
                   capture_output=True)
    rows, expected = read_jsonl(output), read_jsonl(fresh)
    keys = [(row["prompt_id"], row["sample_index"]) for row in rows]
    assert len(keys) == len(set(keys)) == 80
    assert [row["completion"] for row in rows] == [row["completion"] for row in expected]
    assert len(read_jsonl(log)) == 40  # the cut line was dropped, nothing logged twice

    again = subprocess.run(command + cli_args(prompts, output, "--verifier", "multiple_choice"), env=env,
                           capture_output=True, text=True)
    assert "0 samples generated now" in again.stdout and read_jsonl(output) == rows


def test_a_log_written_with_other_settings_is_refused(tmp_path, tiny_model, tokenizer):
    run(tiny_model, tokenizer, prompt_rows(2), tmp_path / "out.jsonl", temperature=0.7)
    with pytest.raises(cli.UsageError, match=r"other settings \(temperature: 0.7 there, 1.0 now\)"):
        run(tiny_model, tokenizer, prompt_rows(2), tmp_path / "out.jsonl", temperature=1.0)
    with pytest.raises(cli.UsageError, match="different problem at row 0"):
        run(tiny_model, tokenizer, prompt_rows(3)[1:], tmp_path / "out.jsonl", temperature=0.7)


BAD_INPUTS = {
    "malformed_json": ('{"prompt": "fine"}\n\n{"prompt": "cut\n', [], r"prompts.jsonl:3: invalid JSON"),
    "missing_prompt_column": ('{"prompt": "fine"}\n{"question": "where is the prompt"}\n', [],
                              r"prompts.jsonl:2: missing column 'prompt' \(columns present: \['question'\]\)"),
    "not_an_object": ('{"prompt": "fine"}\n["prompt"]\n', [], r"prompts.jsonl:2: expected a JSON object, got list"),
    "empty_prompt": ('{"prompt": "  "}\n', [], r"prompts.jsonl:1: the prompt is empty"),
    "too_long": ('{"prompt": "fine"}\n{"prompt": "' + "word " * 200 + '"}\n', ["--max-prompt-length", "64"],
                 r"prompts.jsonl:2: the prompt has \d+ tokens, over max_prompt_length=64"),
    "unknown_verifier": ('{"prompt": "fine"}\n', ["--verifier", "no_such_verifier"], r"--verifier 'no_such_verifier': Unknown verifier"),
    "verifier_module_missing": ('{"prompt": "fine"}\n', ["--verifier", "no_such_module:score"], r"importing 'no_such_module' failed"),
    "bad_temperature": ('{"prompt": "fine"}\n', ["--temperature", "0"], r"--temperature must be > 0"),
    "output_is_the_prompt_file": ('{"prompt": "fine"}\n', ["--output", "PROMPTS"],
                                  r"--output .*prompts.jsonl is the input .*prompts.jsonl: writing it would destroy the input"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_file_line_before_the_model_loads(tmp_path, monkeypatch, capsys, case):
    text, extra, message = BAD_INPUTS[case]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(text)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad input")

    monkeypatch.setattr(generate, "load_model", no_model)
    extra = [str(prompts) if value == "PROMPTS" else value for value in extra]
    assert cli.main(cli_args(prompts, tmp_path / "out.jsonl", *extra)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("sd-plugin generate: ")
    assert __import__("re").search(message, error), error
    assert not list(tmp_path.glob("out*"))  # nothing written
    assert prompts.read_text() == text


def test_verifier_kwargs_must_be_a_json_object(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_rows(1))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cli_args(prompts, tmp_path / "out.jsonl", "--verifier", "multiple_choice", "--verifier-kwargs", "[1]"))
    assert exit_info.value.code == 2
    assert "--verifier-kwargs: expected a JSON object, got list" in capsys.readouterr().err


@pytest.mark.slow  # the whole loop on the tiny model, ~1 min
def test_iterated_loop_smoke_runs_every_stage_and_resumes(tmp_path):
    """benchmarks/bench_iterated.py --smoke: generate, SFT round 1, round-2 corpora, stats, mix, round 2 naive and
    mixed, eval-stats; a second run reuses every corpus and adapter."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "bench_iterated.py"), "--smoke", "--out", str(tmp_path)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["eval"]) == ["base", "r1", "r2-naive", "r2-mixed"]
    assert set(results["corpora"]) == {"corpus_base_T.kept.jsonl", "corpus_r1_T.kept.jsonl", "corpus_r1_hot.kept.jsonl"}
    for name in ("adapter_r1", "adapter_r2_naive", "adapter_r2_mixed"):
        assert (tmp_path / name / "adapter_model.safetensors").exists()
    assert (tmp_path / "coverage.png").stat().st_size > 0
    for row in read_jsonl(tmp_path / "corpus_r1_T.jsonl"):
        assert row["provenance"]["adapter"] == str(tmp_path / "adapter_r1") and row["round"] == "r1"
    assert all(row["_provenance"]["round"] in (1, 2) for row in read_jsonl(tmp_path / "corpus_r2_mixed.jsonl"))

    second = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("0 samples generated now") == 7  # 3 corpora + 4 evaluations, all from the logs
    assert second.stdout.count("trained in an earlier run, kept") == 3
