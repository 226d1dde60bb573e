"""SD-Zero: revision collection (scripted policy), the SRT rows and loss, the distill teacher input and loss
mask, every option's effect, the Axolotl strategy and configs (end-to-end runs are slow)."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig

from sd_plugin import losses as losses_module
from sd_plugin import rows as rows_module
from sd_plugin.contexts import CONTROL_PHRASES, control_phrases, render_ids, sdzero_teacher_ids
from sd_plugin.data import Columns, prompt_record
from sd_plugin.revisions import RevisionOptions, attempts_path, collect_revisions
from sd_plugin.rollout import Rollouts
from sd_plugin.testing import build_model, read_jsonl
from sd_plugin.trainers import base as base_module
from sd_plugin.trainers.base import SelfDistillationCollator
from sd_plugin.trainers.sdzero import PHASE_ONLY_OPTIONS, SDZeroConfig, SDZeroOptions, SDZeroTrainer, srt_rows

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "example_configs" / "assets" / "data"
QWEN = CONTROL_PHRASES["qwen"]
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


def chemistry_rows(indices):
    rows = read_jsonl(DATA / "chemistry_train.jsonl")
    return [rows[i] for i in indices]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer, row):
    record = prompt_record(row)
    return render_ids(tokenizer, record["messages"], record["tools"])


# ====================================================================== a scripted policy for collection
def answer_text(letter, attempt):
    return f"<reasoning>\n{attempt} look at the options.\n</reasoning>\n<answer>\n{letter}\n</answer>"


def next_letter(letter):
    return "ABCD"[("ABCD".index(letter) + 1) % 4]


class ScriptedReviser(torch.nn.Module):
    """Stands in for the policy's `generate`: answers by rule from the question it is shown, records every call.

    First attempt (nothing after the assistant header): the gold letter when `first_correct(idx)`. A revision (the
    assistant turn already holds y_init and a control phrase): the gold letter when `revision_correct(idx, k)` for
    the k-th revision of that prompt. A wrong letter is the next one, or a random one (torch's RNG) with
    `random_wrong`. `crash_on_call` raises at that generate call (a simulated crash).
    """

    def __init__(self, tokenizer, problems, first_correct, revision_correct, *, random_wrong=False, crash_on_call=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.gold = {}
        for row in problems:
            for key in ("prompt", "question"):
                if isinstance(row.get(key), str):
                    self.gold[row[key]] = (row["answer"], row["idx"])
        self.first_correct, self.revision_correct = first_correct, revision_correct
        self.random_wrong, self.crash_on_call = random_wrong, crash_on_call
        self.device = torch.device("cpu")
        self.calls = []

    def wrong(self, gold):
        if self.random_wrong:
            return [c for c in "ABCD" if c != gold][int(torch.randint(3, (1,)))]
        return next_letter(gold)

    def generate(self, input_ids, attention_mask, generation_config, logits_processor=(), **unused):
        # Sampling settings as generate_rollouts passes them: an explicit config, temperature / top-p as processors.
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        max_new_tokens, pad_token_id = generation_config.max_new_tokens, generation_config.pad_token_id
        temperature = next((p.temperature for p in logits_processor if isinstance(p, TemperatureLogitsWarper)), 1.0)
        top_p = next((p.top_p for p in logits_processor if isinstance(p, TopPLogitsWarper)), 1.0)
        if self.crash_on_call == len(self.calls):
            raise RuntimeError("simulated crash")
        prompts = [self.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(input_ids, attention_mask)]
        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p})
        outputs, seen = [], {}
        for text in prompts:
            gold, idx = next(value for question, value in self.gold.items() if question in text)
            turn = text.rsplit("<|im_start|>assistant\n", 1)[1]
            if not turn:
                letter = gold if self.first_correct(idx) else self.wrong(gold)
                response = answer_text(letter, "A first")
            else:
                k = seen[text] = seen.get(text, -1) + 1
                letter = gold if self.revision_correct(idx, k) else self.wrong(gold)
                response = answer_text(letter, "A second")
            outputs.append((encode(self.tokenizer, response) + [self.tokenizer.eos_token_id])[:max_new_tokens])
        width = max(len(o) for o in outputs)
        new = torch.tensor([o + [pad_token_id] * (width - len(o)) for o in outputs])
        return torch.cat([input_ids, new], dim=1)


def first_correct_rule(idx):
    return idx % 3 == 0


def revision_correct_rule(idx, k):
    return (idx + k) % 4 != 1


def scripted(tokenizer, problems, **kwargs):
    return ScriptedReviser(tokenizer, problems, first_correct_rule, revision_correct_rule, **kwargs)


def expected_kept_rows(problems, num_revisions, revise_correct=True):
    rows = []
    for source_row, problem in enumerate(problems):
        correct = first_correct_rule(problem["idx"])
        if not (revise_correct or not correct):
            continue
        letter = problem["answer"] if correct else next_letter(problem["answer"])
        for k in range(num_revisions):
            if revision_correct_rule(problem["idx"], k):
                rows.append({**problem, "source_row": source_row, "y_init": answer_text(letter, "A first"),
                             "initially_correct": correct, "control_phrase": QWEN["correct" if correct else "incorrect"],
                             "y_revised": answer_text(problem["answer"], "A second")})
    return rows


@pytest.fixture(scope="module")
def problems():
    return read_jsonl(DATA / "sdzero_problems.jsonl")[:6]


def test_collection_keeps_exactly_the_verified_revisions(tmp_path, tokenizer, problems):
    output = tmp_path / "revisions.jsonl"
    options = RevisionOptions(verifier="multiple_choice", num_revisions=2, batch_size=4, max_prompt_length=512)
    summary = collect_revisions(scripted(tokenizer, problems), tokenizer, problems, output, options, progress=False)
    expected = expected_kept_rows(problems, num_revisions=2)
    assert read_jsonl(output) == expected
    assert 0 < len(expected) < 2 * len(problems)
    initially = sum(first_correct_rule(p["idx"]) for p in problems)
    assert (summary.attempted, summary.initially_correct, summary.revised, summary.kept) == (len(problems), initially, len(problems), len(expected))


def test_revision_prompt_prefills_the_assistant_turn_with_y_init_and_the_phrase(tmp_path, tokenizer, problems):
    model = scripted(tokenizer, problems[:2])
    options = RevisionOptions(verifier="multiple_choice", max_prompt_length=512, control_phrase_incorrect="Nope, again:")
    collect_revisions(model, tokenizer, problems[:2], tmp_path / "r.jsonl", options, progress=False)
    first_call, revision_call = model.calls
    for problem, first, revision in zip(problems[:2], first_call["prompts"], revision_call["prompts"]):
        correct = first_correct_rule(problem["idx"])
        y_init = answer_text(problem["answer"] if correct else next_letter(problem["answer"]), "A first")
        phrase = QWEN["correct"] if correct else "Nope, again:"
        assert first == tokenizer.decode(chat_ids(tokenizer, problem))
        expected_ids = chat_ids(tokenizer, problem) + encode(tokenizer, y_init) + encode(tokenizer, f"\n\n{phrase}\n\n")
        assert revision == tokenizer.decode(expected_ids)


def test_collection_resumes_after_a_crash_without_duplicates(tmp_path, tokenizer, problems, caplog):
    options = RevisionOptions(verifier="multiple_choice", num_revisions=2, batch_size=2, max_prompt_length=512)
    reference = tmp_path / "reference.jsonl"
    collect_revisions(scripted(tokenizer, problems), tokenizer, problems, reference, options, progress=False)

    output = tmp_path / "revisions.jsonl"
    crashing = scripted(tokenizer, problems, crash_on_call=2)  # batch 0 finishes (2 calls), batch 1 crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        collect_revisions(crashing, tokenizer, problems, output, options, progress=False)
    log = attempts_path(output)
    assert [a["source_row"] for a in read_jsonl(log)] == [0, 1]
    with open(log, "a") as handle:
        handle.write('{"source_row": 2, "fingerpr')  # a line cut off by the crash

    resumed = scripted(tokenizer, problems)
    summary = collect_revisions(resumed, tokenizer, problems, output, options, progress=False)
    assert "dropping an unfinished last line" in caplog.text
    asked = " ".join(p for call in resumed.calls for p in call["prompts"])
    assert problems[0]["prompt"] not in asked and problems[1]["prompt"] not in asked and problems[2]["prompt"] in asked
    assert read_jsonl(output) == read_jsonl(reference) == expected_kept_rows(problems, 2)
    assert [a["source_row"] for a in read_jsonl(log)] == list(range(len(problems)))
    assert summary.attempted == len(problems)

    again = scripted(tokenizer, problems)
    collect_revisions(again, tokenizer, problems, output, options, progress=False)
    assert again.calls == [] and read_jsonl(output) == read_jsonl(reference)


def test_resume_refuses_a_log_written_for_other_problems(tmp_path, tokenizer, problems):
    options = RevisionOptions(verifier="multiple_choice", max_prompt_length=512)
    output = tmp_path / "r.jsonl"
    collect_revisions(scripted(tokenizer, problems[:2]), tokenizer, problems[:2], output, options, progress=False)
    changed = [dict(problems[0], answer=next_letter(problems[0]["answer"])), problems[1]]
    with pytest.raises(ValueError, match="different problem at row 0"):
        collect_revisions(scripted(tokenizer, changed), tokenizer, changed, output, options, progress=False)


def test_bad_problem_rows_fail_naming_the_row(tmp_path, tokenizer, problems):
    options = RevisionOptions(verifier="multiple_choice", max_prompt_length=512)
    with pytest.raises(ValueError, match="problems:2: the prompt is empty"):
        collect_revisions(scripted(tokenizer, problems), tokenizer, [problems[0], {"prompt": ""}], tmp_path / "r.jsonl",
                          options, progress=False)
    with pytest.raises(ValueError, match="verifier is required"):
        collect_revisions(scripted(tokenizer, problems), tokenizer, problems, tmp_path / "r.jsonl", RevisionOptions())


TOOLS = [{"type": "function", "function": {"name": "lookup_mass", "parameters": {"type": "object", "properties": {}}}}]
COLLECTION_CASES = {
    "verifier": "boxed_math",
    "verifier_kwargs": {"answer_field": "alt_answer"},
    "num_revisions": 2,
    "revise_correct": False,
    "max_new_tokens": 6,
    "temperature": 0.7,
    "top_p": 0.9,
    "batch_size": 1,
    "success_reward_threshold": 2.0,
    "control_phrase_family": "olmo",
    "control_phrase_correct": "Once more, shorter:",
    "control_phrase_incorrect": "Not right, again:",
    "separator": "\n",
    "max_prompt_length": 64,
    "max_kept": 1,
    "seed": 1,
    "prompt_column": "question",
    "tools_column": "functions",
}


def collection_trace(tmp_path, tokenizer, problems, name, **overrides):
    rows = [dict(p, question=f"Briefly: {p['prompt']}", functions=TOOLS, alt_answer=next_letter(p["answer"])) for p in problems]
    model = scripted(tokenizer, rows, random_wrong=True)
    options = RevisionOptions(**{"verifier": "multiple_choice", "max_prompt_length": 512, "batch_size": 2, **overrides})
    try:
        summary = collect_revisions(model, tokenizer, rows, tmp_path / f"{name}.jsonl", options, progress=False)
    except ValueError as error:
        return ("rejected", str(error))
    return {"rows": read_jsonl(tmp_path / f"{name}.jsonl"), "calls": model.calls,
            "summary": (summary.attempted, summary.initially_correct, summary.revised, summary.kept)}


def test_every_collection_option_is_exercised():
    from dataclasses import fields

    assert {f.name for f in fields(RevisionOptions)} == set(COLLECTION_CASES)


def declaring_class(cls, name):
    return next(klass for klass in cls.__mro__ if name in klass.__dict__.get("__annotations__", {}))


def test_collection_and_training_options_are_declared_once():
    """collect-revisions and phase distill must judge and phrase alike: their common fields have one declaration."""
    from sd_plugin.trainers.base import SelfDistillationOptions

    collection = {f.name: f for f in dataclasses.fields(RevisionOptions)}
    training = {f.name: f for f in dataclasses.fields(SDZeroOptions)}
    sampling = {f.name for f in dataclasses.fields(SelfDistillationOptions)}  # temperature, top_p: each its own setting
    shared = (set(collection) & set(training)) - sampling
    assert {"verifier", "verifier_kwargs", "success_reward_threshold", "control_phrase_family", "control_phrase_correct",
            "control_phrase_incorrect", "separator", "prompt_column", "tools_column"} <= shared
    for name in shared:
        assert declaring_class(RevisionOptions, name) is declaring_class(SDZeroOptions, name), name
        assert collection[name].default == training[name].default, name
        assert collection[name].metadata["help"] == training[name].metadata["help"], name


def test_collection_accepts_the_old_threshold_name_with_a_warning():
    with pytest.warns(FutureWarning, match="success_threshold is deprecated: use success_reward_threshold"):
        options = RevisionOptions(verifier="multiple_choice", success_threshold=0.5)
    assert options.success_reward_threshold == 0.5


@pytest.fixture(scope="module")
def collection_baseline(tmp_path_factory, tokenizer, problems):
    folder = tmp_path_factory.mktemp("collection")
    baseline = collection_trace(folder, tokenizer, problems[:4], "baseline")
    assert baseline == collection_trace(folder, tokenizer, problems[:4], "again")  # deterministic
    return baseline


@pytest.mark.parametrize("name", sorted(COLLECTION_CASES))
def test_collection_option_changes_the_result(tmp_path, tokenizer, problems, collection_baseline, name):
    changed = collection_trace(tmp_path, tokenizer, problems[:4], name, **{name: COLLECTION_CASES[name]})
    assert changed != collection_baseline
    if isinstance(changed, tuple):  # rejected, by a check that names the option
        assert name in changed[1], changed[1]


def accept_all(prompt, completion, record):
    return 1.0, None


def test_cli_collects_with_a_real_model(tmp_path, capsys):
    from sd_plugin.cli import main

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(row) + "\n" for row in read_jsonl(DATA / "sdzero_problems.jsonl")[:2]))
    output = tmp_path / "revisions.jsonl"
    code = main(["collect-revisions", "--model", str(REPO / "example_configs/assets/tiny-qwen3"), "--problems", str(problems),
                 "--output", str(output), "--verifier", "test_sdzero:accept_all", "--max-new-tokens", "4",
                 "--separator", "\\n", "--no-progress"])
    assert code == 0
    assert "attempted 2, initially correct 2, revised 2, kept 2" in capsys.readouterr().out
    rows = read_jsonl(output)
    assert [r["source_row"] for r in rows] == [0, 1] and all(r["control_phrase"] == QWEN["correct"] for r in rows)


def test_shipped_tiny_data_is_the_collectors_output(tmp_path, tokenizer):
    """example_configs/assets/data/sdzero_*.jsonl: chemistry rows, and their revisions by the scripted policy."""
    shipped = read_jsonl(DATA / "sdzero_problems.jsonl")
    chemistry = {json.dumps(row, sort_keys=True) for row in read_jsonl(DATA / "chemistry_train.jsonl")}
    assert all(json.dumps(row, sort_keys=True) in chemistry for row in shipped)
    options = RevisionOptions(verifier="multiple_choice", num_revisions=2, max_prompt_length=384)
    collect_revisions(scripted(tokenizer, shipped), tokenizer, shipped, tmp_path / "r.jsonl", options, progress=False)
    assert read_jsonl(tmp_path / "r.jsonl") == read_jsonl(DATA / "sdzero_revisions.jsonl")


# ====================================================================== contexts
def test_teacher_input_is_prompt_response_phrase_then_the_response_scored():
    prompt, response, delimiter, eos = [1, 2, 3], [10, 11, 12, 99], [50, 51], 99
    teacher = sdzero_teacher_ids(prompt, response, delimiter, max_length=100, end_of_turn_ids=[eos])
    # The first copy plays y_init (text without end-of-turn); the second copy is the whole sampled y.
    assert teacher.teacher_input_ids == [1, 2, 3, 10, 11, 12, 50, 51]
    assert (teacher.scored_length, teacher.truncated_tokens) == (4, 0)
    # Exactly at the cap: |x| + |y without eos| + |delimiter| + |y| = 3 + 3 + 2 + 4 = 12.
    assert sdzero_teacher_ids(prompt, response, delimiter, max_length=12, end_of_turn_ids=[eos]).truncated_tokens == 0


def test_teacher_input_over_the_cap_shortens_both_copies_of_y_and_never_x():
    prompt, response, delimiter = list(range(100, 110)), list(range(20)), [50, 51, 52]
    teacher = sdzero_teacher_ids(prompt, response, delimiter, max_length=30)
    kept = (30 - 10 - 3) // 2
    assert kept == 8
    assert teacher.teacher_input_ids == prompt + response[:kept] + delimiter
    assert (teacher.scored_length, teacher.truncated_tokens) == (kept, 20 - kept)
    assert len(teacher.teacher_input_ids) + teacher.scored_length <= 30
    assert sdzero_teacher_ids(prompt, response, delimiter, max_length=14) is None  # not one token of y fits
    assert sdzero_teacher_ids(prompt, response, delimiter, max_length=15).scored_length == 1  # 10 + 1 + 3 + 1


def test_control_phrases_per_family_and_override():
    assert control_phrases("qwen") == {True: "Let me rephrase the above solution.",
                                       False: "Wait, this response is wrong. Let me correct it."}
    assert control_phrases("olmo")[False] == "Wrong. I need to redo all."
    assert control_phrases("qwen", incorrect="Try again.")[False] == "Try again."
    with pytest.raises(ValueError, match="control_phrase_family must be one of"):
        control_phrases("llama")


# ====================================================================== SRT
def srt_record(**overrides):
    row = dict(chemistry_rows([1])[0], y_init="<answer>\nB\n</answer>", control_phrase=QWEN["incorrect"],
               y_revised="<reasoning>\nRecount the atoms.\n</reasoning>\n<answer>\nA\n</answer>")
    row.update(overrides)
    return row


def make_args(tmp_path, phase, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                    report_to="none", save_strategy="no", learning_rate=1e-2, use_cpu=True, seed=0, phase=phase,
                    max_prompt_length=384, max_completion_length=96)
    if phase == "distill":
        settings.update(verifier="multiple_choice", max_completion_length=24, max_teacher_prompt_length=512)
    settings.update(overrides)
    return SDZeroConfig(**settings)


@pytest.mark.parametrize("objective", ["joint", "revision", "generation"])
def test_srt_rows_cover_exactly_the_intended_tokens(tokenizer, objective):
    row = srt_record()
    options = SDZeroOptions(phase="srt", srt_objective=objective)
    rows = srt_rows(tokenizer, row, 0, Columns(), options)
    chat = chat_ids(tokenizer, row)
    y_init, y_revised = encode(tokenizer, row["y_init"]), encode(tokenizer, row["y_revised"])
    delimiter = encode(tokenizer, "\n\n" + QWEN["incorrect"] + "\n\n")
    eos = tokenizer.eos_token_id
    revision = {"input_ids": chat + y_init + delimiter, "completion_ids": y_revised + [eos], "srt_objective": "revision"}
    generation = {"input_ids": chat, "completion_ids": y_init + delimiter + y_revised + [eos], "srt_objective": "generation"}
    expected = {"joint": [revision, generation], "revision": [revision], "generation": [generation]}[objective]
    assert rows == expected
    # Both objectives are the same token sequence, split at a different position.
    assert revision["input_ids"] + revision["completion_ids"] == generation["input_ids"] + generation["completion_ids"]
    assert tokenizer.decode(revision["completion_ids"]) == row["y_revised"] + tokenizer.eos_token


def test_srt_loss_is_the_cross_entropy_of_exactly_the_target_tokens(tmp_path, tokenizer):
    model = build_model("qwen3", tokenizer)
    trainer = SDZeroTrainer(model=model, args=make_args(tmp_path, "srt"), train_dataset=Dataset.from_list([srt_record()]),
                            processing_class=tokenizer)
    assert trainer.train_dataset["srt_objective"] == ["revision", "generation"]
    collate = SelfDistillationCollator(tokenizer)
    for prepared in trainer.train_dataset:
        context, targets = prepared["input_ids"], prepared["completion_ids"]
        with torch.no_grad():
            loss = trainer.compute_loss(model, collate([prepared]))
            logits = model(torch.tensor([context + targets])).logits[0]
        reference = F.cross_entropy(logits[len(context) - 1: -1], torch.tensor(targets))
        torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    assert trainer.teacher.kind == "live" and trainer.teacher.copy is None  # SRT keeps no teacher copy


def test_srt_trains_and_logs_both_objectives(tmp_path, tokenizer):
    rows = [srt_record(), srt_record(y_revised="<answer>\nA\n</answer>", control_phrase=QWEN["correct"])]
    trainer = SDZeroTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, "srt", per_device_train_batch_size=4),
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    logged = trainer.state.log_history[0]
    # ce_loss, kl and distillation_loss would repeat the loss (every SRT token is cross-entropy): not logged
    assert {"loss", "revision_loss", "generation_loss"} <= set(logged)
    assert not {"ce_loss", "kl", "distillation_loss", "self_distillation/distillation_loss"} & set(logged)
    import sd_plugin

    assert sd_plugin.SDZeroTrainer is SDZeroTrainer and sd_plugin.SDZeroConfig is SDZeroConfig


@pytest.mark.parametrize(
    "row,overrides,match",
    [
        (srt_record(y_revised=" "), {}, "row 0: 'y_revised' must be a non-empty string"),
        ({"prompt": "q", "y_init": "a", "control_phrase": "p"}, {}, "row 0: 'y_revised' must be a non-empty string"),
        (srt_record(), {"max_completion_length": 20}, "row 0: the assistant turn y_init"),
        (srt_record(), {"max_prompt_length": 64}, "row 0: the prompt has"),
    ],
)
def test_bad_srt_rows_fail_naming_the_row(tmp_path, tokenizer, row, overrides, match):
    with pytest.raises(ValueError, match=match):
        SDZeroTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, "srt", **overrides),
                      train_dataset=Dataset.from_list([row]), processing_class=tokenizer)


def test_phase_and_dataset_kind_must_match(tmp_path, tokenizer):
    prompt_rows = Dataset.from_list([{"input_ids": [1, 2], "sd_record": "{}"}])
    srt_prepared = Dataset.from_list([{"input_ids": [1, 2], "completion_ids": [3], "srt_objective": "revision"}])
    with pytest.raises(ValueError, match="phase: srt trains on kept revisions"):
        SDZeroTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, "srt"), train_dataset=prompt_rows,
                      processing_class=tokenizer)
    with pytest.raises(ValueError, match="phase: distill samples from prompt rows"):
        SDZeroTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, "distill"), train_dataset=srt_prepared,
                      processing_class=tokenizer)


# ====================================================================== distill
def fixed_rollouts(tokenizer, completions_by_question, *, old_logprob=None):
    """A `sample` replacement: each prompt gets its question's completion (ids end with eos), num_generations times."""

    def sample(self, model, prompt_ids, prompt_mask):
        texts = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(prompt_ids, prompt_mask)]
        completions = [next(ids for question, ids in completions_by_question.items() if question in text) for text in texts]
        options = self.sampling_options()
        completions = [c for c in completions for _ in range(options.num_generations)]
        ids, mask = rows_module.right_pad(completions, tokenizer.pad_token_id)
        index = torch.arange(len(texts)).repeat_interleave(options.num_generations)
        old = None if old_logprob is None else torch.full(ids.shape, old_logprob)
        self.sampled_with = (options.max_new_tokens, options.temperature, options.top_p, options.top_k, options.num_generations,
                             options.record_logprobs)
        return Rollouts(ids, mask, index, torch.zeros(len(completions), dtype=torch.bool), old)

    return sample


def spy_forwards(monkeypatch):
    seen = []
    real = base_module.completion_hidden_states

    def spy(unwrapped, model, prompt_ids, prompt_mask, completion_ids, completion_mask, **tiling):
        seen.append(([ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)],
                     completion_ids.clone(), completion_mask.clone()))
        return real(unwrapped, model, prompt_ids, prompt_mask, completion_ids, completion_mask, **tiling)

    monkeypatch.setattr(base_module, "completion_hidden_states", spy)
    return seen


def student_and_teacher(forwards, student_prompts):
    """The two forwards of one step, told apart by their prompts (the student's are the chat-template prompts)."""
    (first, second) = forwards
    return (first, second) if all(p in student_prompts for p in first[0]) else (second, first)


def spy_loss(monkeypatch):
    seen = []
    real = base_module.chunked_distillation_loss

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append({"mask": args[3].clone(), "loss": out.loss.item(), **dataclasses.asdict(args[4]),
                     **{k: kwargs[k] for k in ("loss_reduction", "num_loss_tokens_to_skip")}})
        return out

    monkeypatch.setattr(base_module, "chunked_distillation_loss", spy)
    return seen


def test_distill_teacher_sees_prompt_response_phrase_and_scores_the_second_copy(tmp_path, tokenizer, monkeypatch):
    right, wrong = chemistry_rows([1, 11])
    y_right = encode(tokenizer, answer_text(right["answer"], "One")) + [tokenizer.eos_token_id]
    y_wrong = encode(tokenizer, answer_text(next_letter(wrong["answer"]), "Another long")) + [tokenizer.eos_token_id]
    monkeypatch.setattr(SDZeroTrainer, "sample", fixed_rollouts(tokenizer, {right["prompt"]: y_right, wrong["prompt"]: y_wrong}))
    forwards, loss_calls = spy_forwards(monkeypatch), spy_loss(monkeypatch)
    trainer = SDZeroTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path, "distill", max_steps=1),
                            train_dataset=Dataset.from_list([right, wrong]), processing_class=tokenizer,
                            peft_config=LoraConfig(**LORA))
    trainer.train()
    student, teacher = student_and_teacher(forwards, [chat_ids(tokenizer, right), chat_ids(tokenizer, wrong)])
    (student_prompts, student_ids, student_mask), (teacher_prompts, teacher_ids, teacher_mask) = student, teacher
    for i, prompt in enumerate(student_prompts):
        is_right = prompt == chat_ids(tokenizer, right)
        y = y_right if is_right else y_wrong
        phrase = QWEN["correct"] if is_right else QWEN["incorrect"]
        assert prompt == chat_ids(tokenizer, right if is_right else wrong)
        assert teacher_prompts[i] == prompt + y[:-1] + encode(tokenizer, f"\n\n{phrase}\n\n")
        assert teacher_ids[i, : len(y)].tolist() == y and int(teacher_mask[i].sum()) == len(y)
    assert torch.equal(student_ids, teacher_ids) and torch.equal(student_mask, teacher_mask)
    (call,) = loss_calls
    assert torch.equal(call["mask"], student_mask)  # the whole second copy (eos included), no token skipped
    assert (call["distillation_alpha"], call["distillation_mode"], call["distillation_topk"], call["distillation_support"],
            call["distillation_add_tail"], call["loss_reduction"], call["num_loss_tokens_to_skip"]) == \
        (0.5, "topk_logits", 64, "teacher", False, "token", 0)
    assert trainer.state.log_history[0]["correct_fraction"] == 0.5


def padded_question(tokenizer, target_length, system, word):
    """A chemistry-like prompt whose chat-template ids have exactly `target_length` tokens (filled with `word`)."""
    for words in range(1, 400):
        for ending in ("", ".", " ."):
            row = {"prompt": f"Which option? {' '.join([word] * words)}{ending}\nA: 1\nB: 2\nC: 3\nD: 4",
                   "system": system, "answer": "A", "idx": 0}
            if len(chat_ids(tokenizer, row)) == target_length:
                return row
    raise AssertionError(f"no padding of {word!r} gives {target_length} tokens")


def test_distill_over_the_teacher_cap_shortens_y_symmetrically_and_never_cuts_x(tmp_path, tokenizer, monkeypatch):
    system = chemistry_rows([1])[0]["system"]
    short = padded_question(tokenizer, 150, system, "carbon")
    y = encode(tokenizer, answer_text("B", "A rather long and winding")) + [tokenizer.eos_token_id]
    incorrect = encode(tokenizer, "\n\n" + QWEN["incorrect"] + "\n\n")
    kept = 6
    cap = 150 + len(incorrect) + 2 * kept + 1
    long = padded_question(tokenizer, cap - len(incorrect) - 1, system, "oxygen")  # fits the prompt cap, not one token of y
    monkeypatch.setattr(SDZeroTrainer, "sample", fixed_rollouts(tokenizer, {short["prompt"]: y, long["prompt"]: y}))
    forwards, loss_calls = spy_forwards(monkeypatch), spy_loss(monkeypatch)
    trainer = SDZeroTrainer(model=build_model("qwen3", tokenizer),
                            args=make_args(tmp_path, "distill", max_steps=1, max_prompt_length=cap, max_teacher_prompt_length=cap),
                            train_dataset=Dataset.from_list([short, long]), processing_class=tokenizer)
    trainer.train()
    student, teacher = student_and_teacher(forwards, [chat_ids(tokenizer, short), chat_ids(tokenizer, long)])
    (student_prompts, _, student_mask), (teacher_prompts, teacher_ids, teacher_mask) = student, teacher
    row = student_prompts.index(chat_ids(tokenizer, short))
    other = 1 - row
    assert teacher_prompts[row] == chat_ids(tokenizer, short) + y[:kept] + incorrect
    assert len(teacher_prompts[row]) + kept <= cap
    assert int(teacher_mask[row].sum()) == kept == int(student_mask[row].sum())
    assert teacher_ids[row, :kept].tolist() == y[:kept]
    assert teacher_prompts[other] == []  # no teacher input: the long prompt is never cut
    (call,) = loss_calls
    assert call["mask"][row].tolist() == [1] * kept + [0] * (len(y) - kept) and call["mask"][other].sum() == 0
    logged = trainer.state.log_history[0]
    assert logged["teacher_truncated_tokens"] == len(y) - kept and logged["no_teacher_signal_fraction"] == 0.5


def test_distill_default_loss_is_half_forward_half_reverse_kl_on_the_teachers_top64(tmp_path, tokenizer, monkeypatch):
    rows = chemistry_rows([1, 11])
    ys = [encode(tokenizer, answer_text("C", "Some")) + [tokenizer.eos_token_id],
          encode(tokenizer, answer_text("D", "Some other")) + [tokenizer.eos_token_id]]
    monkeypatch.setattr(SDZeroTrainer, "sample", fixed_rollouts(tokenizer, {r["prompt"]: y for r, y in zip(rows, ys)}))
    forwards = spy_forwards(monkeypatch)
    model = build_model("qwen3", tokenizer)
    reference_model = copy.deepcopy(model).eval()
    trainer = SDZeroTrainer(model=model, args=make_args(tmp_path, "distill"), train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    batch = SelfDistillationCollator(tokenizer)([trainer.train_dataset[0], trainer.train_dataset[1]])
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    student, teacher = student_and_teacher(forwards, [chat_ids(tokenizer, row) for row in rows])
    (student_prompts, completion_ids, mask), (teacher_prompts, _, _) = student, teacher
    terms = []
    for prompt, teacher_prompt, ids, row_mask in zip(student_prompts, teacher_prompts, completion_ids, mask):
        y = ids[row_mask.bool()].tolist()
        with torch.no_grad():
            student = reference_model(torch.tensor([prompt + y])).logits[0, len(prompt) - 1: -1]
            teacher = reference_model(torch.tensor([teacher_prompt + y])).logits[0, len(teacher_prompt) - 1: -1]
        top = teacher.topk(64, dim=-1).indices
        s = torch.log_softmax(student.gather(-1, top), -1)  # both renormalized over the teacher's top-64
        q = torch.log_softmax(teacher.gather(-1, top), -1)
        forward = (q.exp() * (q - s)).sum(-1)
        reverse = (s.exp() * (s - q)).sum(-1)
        terms.append(0.5 * forward + 0.5 * reverse)
    expected = torch.cat(terms).mean()  # token-level mean over the batch
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)


def test_distill_with_lora_keeps_the_merged_srt_model_as_the_frozen_teacher(tmp_path, tokenizer, monkeypatch):
    """The documented path: SRT with LoRA, merge, new LoRA for distill with teacher_model_kind: base (adapter disabled)."""
    srt = SDZeroTrainer(model=build_model("qwen3", tokenizer), args=make_args(tmp_path / "srt", "srt"),
                        train_dataset=Dataset.from_list([srt_record()]), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    srt.train()
    srt_model = srt.model.merge_and_unload()
    frozen = copy.deepcopy(srt_model).eval()
    row = chemistry_rows([1])[0]
    monkeypatch.setattr(SDZeroTrainer, "sample", fixed_rollouts(tokenizer, {row["prompt"]: encode(tokenizer, "<answer>\nA\n</answer>") + [tokenizer.eos_token_id]}))
    distill = SDZeroTrainer(model=srt_model, args=make_args(tmp_path / "distill", "distill", max_steps=3),
                            train_dataset=Dataset.from_list([row, row]), processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    distill.train()
    probe = torch.tensor([chat_ids(tokenizer, row)])
    with torch.no_grad(), distill.teacher.scoring(distill.model) as teacher:
        teacher_logits = teacher(probe).logits
    with torch.no_grad():
        student_logits = distill.model(probe).logits
    torch.testing.assert_close(teacher_logits, frozen(probe).logits)
    assert not torch.allclose(student_logits, teacher_logits)
    assert "correct_fraction" in distill.state.log_history[0]


# ====================================================================== every option: used, or rejected
TRACE_TOOLS = [{"type": "function", "function": {"name": "molar_mass", "description": "Mass of a SMILES string",
                                                 "parameters": {"type": "object", "properties": {"smiles": {"type": "string"}}}}}]
INVALID_FILE = "<tmp>/bad_rows.jsonl"
# The shared step's numeric guards (skip a non-finite step, check divergences) act the same for every method
# and are tested with the base trainer.
# The run's guards and watches (tests/test_numerics.py, tests/test_watch.py): the step is the same.
BASE_GUARDS = {"max_consecutive_nonfinite_steps", "debug_numerics", "max_steps_without_signal", "stop_on_collapse"}
# The vLLM backend needs a CUDA GPU; its options are tested in tests/test_vllm_rollout.py.
VLLM_OPTIONS = {"use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_tensor_parallel_size",
                "vllm_max_model_length", "vllm_model_impl", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                "vllm_server_timeout", "vllm_group_port"}
# Evaluation during training works the same in both phases; tested in tests/test_evaluation.py.
EVALUATION_OPTIONS = {"eval_prompts", "eval_verifier", "prior_prompts", "prior_verifier", "eval_generation_steps",
                      "eval_max_new_tokens", "eval_num_generations", "eval_temperature"}
# Logging only (the training step is the same), tested in tests/test_completions_log.py.
LOGGING_OPTIONS = {"log_completions", "num_completions_to_print"}
# Sequence tiling gives the untiled step by design (tests/test_tiling.py checks it through the shared step), a
# chunked prefill the one-pass rollouts (tests/test_rollout.py).
BASE_GUARDS |= {"sequence_tile_size", "sequence_tile_offload", "prefill_chunk_size"}
# (phase, option, value, baseline overrides, data with an invalid row)
OPTION_CASES = [
    ("distill", "max_prompt_length", 64, {}, False),
    ("distill", "max_completion_length", 7, {}, False),
    ("distill", "max_teacher_prompt_length", 256, {}, False),
    ("distill", "num_generations", 2, {}, False),
    ("distill", "temperature", 0.7, {}, False),
    ("distill", "top_p", 0.9, {}, False),
    ("distill", "top_k", 5, {}, False),
    ("distill", "distillation_alpha", 0.2, {}, False),
    ("distill", "distillation_divergence", "jsd", {}, False),
    ("distill", "distillation_mode", "full_logits", {}, False),
    ("distill", "distillation_topk", 8, {}, False),
    ("distill", "distillation_support", "student", {}, False),
    ("distill", "distillation_add_tail", True, {}, False),
    ("distill", "distillation_temperature", 2.0, {}, False),
    ("distill", "loss_reduction", "sequence", {}, False),
    ("distill", "num_loss_tokens_to_skip", 2, {}, False),
    ("distill", "distillation_is_clip", 1.5, {}, False),
    ("distill", "importance_sampling_correction", True, {}, False),
    ("distill", "loss_chunk_size", 4, {}, False),
    ("distill", "liger_loss", True, {}, False),
    ("distill", "teacher_model_kind", "ema", {}, False),
    ("distill", "teacher_model_kind", "live", {}, False),
    ("distill", "teacher_update_rate", 0.5, {"teacher_model_kind": "ema"}, False),
    ("distill", "teacher_ema_rank", 1, {"teacher_model_kind": "ema"}, False), # below the EMA's rank (LoRA r 4): truncated
    ("distill", "teacher_sync_steps", 2, {"teacher_model_kind": "ema"}, False),
    ("distill", "skip_invalid", True, {}, True),
    ("distill", "invalid_rows_file", INVALID_FILE, {"skip_invalid": True}, True),
    ("distill", "verifier", "boxed_math", {}, False),
    ("distill", "verifier_kwargs", {"answer_field": "alt_answer"}, {}, False),
    ("distill", "success_reward_threshold", 2.0, {}, False),
    ("distill", "control_phrase_family", "olmo", {}, False),
    ("distill", "control_phrase_correct", "Once more, shorter:", {}, False),
    ("distill", "control_phrase_incorrect", "Not right, again:", {}, False),
    ("distill", "separator", "\n", {}, False),
    ("distill", "prompt_column", "question", {}, False),
    ("distill", "tools_column", "functions", {"max_prompt_length": 384}, False),  # the schema makes the prompt longer
    ("srt", "max_prompt_length", 64, {}, False),
    ("srt", "max_completion_length", 20, {}, False),
    ("srt", "loss_reduction", "sequence", {}, False),
    ("srt", "loss_chunk_size", 4, {}, False),
    ("srt", "skip_invalid", True, {}, True),
    ("srt", "invalid_rows_file", INVALID_FILE, {"skip_invalid": True}, True),
    ("srt", "separator", "\n", {}, False),
    ("srt", "prompt_column", "question", {}, False),
    ("srt", "tools_column", "functions", {}, False),
    ("srt", "srt_objective", "revision", {}, False),
    ("srt", "srt_objective", "generation", {}, False),
]
NONDEFAULT = {
    "max_teacher_prompt_length": 1000, "num_generations": 2, "temperature": 0.7, "top_p": 0.9,
    "top_k": 5, "distillation_alpha": 0.2, "distillation_divergence": "jsd", "distillation_mode": "full_logits",
    "distillation_topk": 8, "distillation_support": "student", "distillation_add_tail": True,
    "distillation_temperature": 2.0, "num_loss_tokens_to_skip": 2, "distillation_is_clip": 1.5,
    "liger_loss": False, "teacher_model_kind": "base", "teacher_update_rate": 0.5, "teacher_ema_rank": 2, "teacher_sync_steps": 2,
    "verifier": "multiple_choice", "verifier_kwargs": {"answer_field": "x"}, "success_reward_threshold": 0.5,
    "control_phrase_family": "olmo", "control_phrase_correct": "Again:", "control_phrase_incorrect": "No:",
    "srt_objective": "revision", "importance_sampling_correction": True, "use_vllm": True, "vllm_mode": "server",
    "vllm_gpu_memory_utilization": 0.5, "vllm_enable_sleep_mode": True, "vllm_tensor_parallel_size": 2,
    "vllm_max_model_length": 9000, "vllm_model_impl": "transformers", "vllm_server_base_url": "http://h:1",
    "vllm_server_host": "h", "vllm_server_port": 1, "vllm_server_timeout": 1.0, "vllm_group_port": 1,
    "log_completions": True, "num_completions_to_print": 2, "prefill_chunk_size": 4096,
}


def test_every_option_changes_behaviour_or_is_rejected_in_each_phase():
    from dataclasses import fields

    names = {f.name for f in fields(SDZeroOptions)} - {"phase"}
    for phase, other in (("distill", "srt"), ("srt", "distill")):
        exercised = {name for case_phase, name, *_ in OPTION_CASES if case_phase == phase}
        rejected = set(PHASE_ONLY_OPTIONS[other])
        assert not exercised & rejected
        assert exercised | rejected | BASE_GUARDS | EVALUATION_OPTIONS | LOGGING_OPTIONS | (VLLM_OPTIONS if phase == "distill" else set()) == names, phase


@pytest.mark.parametrize("phase,other", [("srt", "distill"), ("distill", "srt")])
def test_options_of_the_other_phase_are_rejected(phase, other):
    base = {"verifier": "multiple_choice"} if phase == "distill" else {}
    for name in PHASE_ONLY_OPTIONS[other]:
        with pytest.raises(ValueError, match=f"{name} is only used with phase: {other}"):
            SDZeroOptions(phase=phase, **base, **{name: NONDEFAULT[name]}).check()


@pytest.mark.parametrize(
    "overrides,match",
    [({}, "phase is required"), ({"phase": "sft"}, "phase is required"), ({"phase": "distill"}, "needs a verifier"),
     ({"phase": "distill", "verifier": "multiple_choice", "teacher_update_rate": 0.3}, "teacher_update_rate is set but teacher_model_kind is 'base'"),
     ({"phase": "srt", "srt_objective": "both"}, "srt_objective must be one of"),
     ({"phase": "distill", "verifier": "multiple_choice", "control_phrase_family": "llama"}, "control_phrase_family")],
)
def test_bad_options_fail_in_the_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        SDZeroOptions(**overrides).check()


def trace_rows(phase, with_invalid_row):
    rows = []
    for index, row in enumerate(chemistry_rows([1, 11])):
        row = dict(row, question=f"Briefly: {row['prompt']}", functions=TRACE_TOOLS, alt_answer=next_letter(row["answer"]))
        if phase == "srt":
            row.update(y_init=answer_text(next_letter(row["answer"]), "A first"), control_phrase=QWEN["incorrect"],
                       y_revised=answer_text(row["answer"], "A second" + " longer" * index))
        rows.append(row)
    if with_invalid_row:
        rows.append(dict(rows[0], prompt="", question=""))
    return rows


def step_trace(tmp_path, tokenizer, monkeypatch, phase, name, options, with_invalid_row):
    """What two training steps did: prepared rows, forward inputs, loss calls and values, sampling, lm_head chunks."""
    right, wrong = chemistry_rows([1, 11])
    completions = {}
    for row, letter, words in ((right, right["answer"], "One"), (wrong, next_letter(wrong["answer"]), "Another long")):
        ids = encode(tokenizer, answer_text(letter, words)) + [tokenizer.eos_token_id]
        completions[row["prompt"]] = ids
    monkeypatch.setattr(SDZeroTrainer, "sample", fixed_rollouts(tokenizer, completions, old_logprob=-20.0))
    forwards, loss_calls = spy_forwards(monkeypatch), spy_loss(monkeypatch)
    chunks = []
    real_chunk = losses_module._chunk_loss_and_logit_grad
    monkeypatch.setattr(losses_module, "_chunk_loss_and_logit_grad", lambda *a: chunks.append(1) or real_chunk(*a))
    out = tmp_path / name
    options = {k: (str(tmp_path / "bad_rows.jsonl") if v == INVALID_FILE else v) for k, v in options.items()}
    if phase == "distill":
        options = {"max_prompt_length": 256, "max_teacher_prompt_length": 512, **options}
    try:
        args = make_args(tmp_path, phase, output_dir=str(out), **options)
        trainer = SDZeroTrainer(model=build_model("qwen3", tokenizer), args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(trace_rows(phase, with_invalid_row)),
                                peft_config=LoraConfig(**LORA))
        trainer.train()
    except (ValueError, ImportError) as error:
        return ("rejected", str(error))
    finally:
        monkeypatch.undo()
    invalid = [p.read_text() if p.exists() else None for p in (out / "invalid_rows_train.jsonl", tmp_path / "bad_rows.jsonl")]
    return {
        "rows": trainer.train_dataset.to_list(),
        "forwards": [(prompts, ids.tolist(), mask.tolist()) for prompts, ids, mask in forwards],
        "losses": [{k: v.tolist() if torch.is_tensor(v) else v for k, v in call.items()} for call in loss_calls],
        "sampled_with": getattr(trainer, "sampled_with", None),
        "chunks": len(chunks),
        "invalid": invalid,
    }


REFERENCE_TRACES = {}  # traces do not depend on tmp paths: one reference per (phase, baseline, data)


@pytest.mark.parametrize("phase,name,value,baseline,with_invalid_row", OPTION_CASES,
                         ids=[f"{c[0]}-{c[1]}={c[2]!r}" for c in OPTION_CASES])
def test_option_changes_the_training_step(tmp_path, tokenizer, monkeypatch, phase, name, value, baseline, with_invalid_row):
    key = (phase, json.dumps(baseline, sort_keys=True), with_invalid_row)
    if key not in REFERENCE_TRACES:
        REFERENCE_TRACES[key] = step_trace(tmp_path, tokenizer, monkeypatch, phase, "reference", baseline, with_invalid_row)
    changed = step_trace(tmp_path, tokenizer, monkeypatch, phase, "changed", {**baseline, name: value}, with_invalid_row)
    assert changed != REFERENCE_TRACES[key]
    if isinstance(changed, tuple):  # rejected, by a check that names the option, never by something unrelated
        assert name in changed[1], changed[1]


def test_step_trace_is_deterministic(tmp_path, tokenizer, monkeypatch):
    for phase in ("distill", "srt"):
        first = step_trace(tmp_path, tokenizer, monkeypatch, phase, "first", {}, False)
        assert isinstance(first, dict) and first["losses"]
        assert step_trace(tmp_path, tokenizer, monkeypatch, phase, "second", {}, False) == first


# ====================================================================== Axolotl
def test_axolotl_strategy_rows_equal_the_python_api_rows(tokenizer):
    from sd_plugin.axolotl.strategies import sdzero as strategy

    rows = read_jsonl(DATA / "sdzero_revisions.jsonl")[:3]
    cfg = {"plugins": ["sd_plugin.SelfDistillationPlugin"], "trainer_type": "sdzero", "sdzero": {"phase": "srt"}}
    produced = strategy.load(tokenizer, cfg, {"path": "revisions.jsonl"}).tokenize_prompt({k: [r[k] for r in rows] for k in rows[0]})
    expected = [r for row in rows for r in srt_rows(tokenizer, row, None, Columns(), SDZeroOptions(phase="srt"))]
    assert produced["input_ids"] == [r["input_ids"] for r in expected]
    assert produced["completion_ids"] == [r["completion_ids"] for r in expected]
    assert produced["srt_objective"] == [r["srt_objective"] for r in expected]
    assert all(set(labels) == {-100} for labels in produced["labels"])
    with pytest.raises(ValueError, match="sdzero.phase: srt"):
        strategy.load(tokenizer, {**cfg, "sdzero": {"phase": "distill", "verifier": "multiple_choice"}}, {})


@pytest.mark.parametrize("name", ["sdzero-srt-qwen3-4b.yml", "sdzero-distill-qwen3-4b.yml", "sdzero-srt-tiny.yml", "sdzero-distill-tiny.yml"])
def test_example_configs_pass_axolotl_validation(name):
    import yaml
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    config = yaml.safe_load((REPO / "example_configs" / name).read_text())
    cfg = DictDefault(config)
    prepare_plugins(cfg)
    validated = validate_config(cfg)
    block = validated["sdzero"]
    assert validated["trainer_type"] == "sdzero" and block["phase"] in ("srt", "distill")
    if "qwen3-4b" in name and block["phase"] == "distill":
        assert (block["distillation_topk"], block["distillation_alpha"], block["distillation_divergence"],
                block["distillation_support"], block["loss_reduction"]) == (64, 0.5, "mixed", "teacher", "token")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["srt", "distill"])
def test_axolotl_train_tiny_configs_run_the_sdzero_trainer(tmp_path, phase):
    import yaml
    from test_axolotl_plugin import PLUGIN_RAN, run_axolotl

    config = yaml.safe_load((REPO / "example_configs" / f"sdzero-{phase}-tiny.yml").read_text())
    config.update(output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"), max_steps=3)
    result = run_axolotl(config, tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert PLUGIN_RAN + "sdzero" in log
    keys = ("revision_loss", "generation_loss") if phase == "srt" else ("correct_fraction", "teacher_truncated_tokens")
    keys += ("loss",)
    for key in keys:
        assert f"'{key}'" in log, key
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert math.isfinite(float(log.split("'train_loss': '")[1].split("'")[0]))
