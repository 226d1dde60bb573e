"""Hostile input, property-based (hypothesis): every record is either tokenized to valid rows or refused
with a RecordError naming its row and the reason; every option block is either accepted or refused with
an error naming the key; a dataset with bad rows trains with `skip_invalid`, which counts the skipped rows
and writes them to a file.

The generated records mix empty and whitespace strings, unicode (emoji, right-to-left, combining marks,
control characters, NUL), chat-template syntax and special-token text, huge demonstrations, chat messages
with missing or unknown roles and non-string contents, tool calls with missing names and invalid JSON
arguments, malformed tool schemas, and caps that nothing fits under. Runs are derandomized (the same
examples every run) so that CI is stable.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import LoraConfig

from sd_plugin import SDFTConfig, SDFTTrainer
from sd_plugin.axolotl.args import SelfDistillationArgs
from sd_plugin.contexts import tokenize_sdft
from sd_plugin.data import Columns, RecordError, sdft_record, split_trace
from sd_plugin.testing import build_model
from sd_plugin.trainers.sdft import SDFTOptions, tokenize_sdft_rows

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])

# ------------------------------------------------------------------ strategies
TRICKY_TEXT = st.sampled_from([
    "", " ", "\n\t ", "\x00", "\u200b", "\ufeffBOM", "é" * 3, "e\u0301", "🧪⚗️🔬", "مرحبا بالعالم", "שלום", "中文测试",
    "<|im_end|>", "<|im_start|>assistant\n", "<think>secret</think>", "</tool_call>", "{{ messages }}", "{% raw %}",
    "{demonstration}", "{question}", "\\u0000", "a" * 300, "line1\r\nline2", "\x1b[31mred\x1b[0m",
])
TEXT = st.one_of(TRICKY_TEXT, st.text(max_size=40), st.text(st.characters(codec="utf-8"), min_size=1, max_size=20))
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "USER", "model", "", None])
JSON_ARGUMENTS = st.one_of(
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), TEXT), max_size=3).map(json.dumps),
    st.sampled_from(["{", "{'a': 1}", "[1, 2", "", "null", "{\"a\": NaN}", "not json"]),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
TOOL_CALL = st.one_of(
    st.builds(lambda name, arguments: {"type": "function", "function": {"name": name, "arguments": arguments}},
              st.one_of(st.sampled_from(["get_weather", "search"]), TEXT), JSON_ARGUMENTS),
    st.builds(lambda name, arguments: {"name": name, "arguments": arguments}, TEXT, JSON_ARGUMENTS),
    st.sampled_from([{}, {"function": {}}, {"function": "get_weather"}, "get_weather", None, 3]),
)


@st.composite
def messages(draw):
    message = {}
    role = draw(ROLES)
    if role is not None or draw(st.booleans()):
        message["role"] = role
    if draw(st.integers(0, 9)) < 8:
        message["content"] = draw(st.one_of(TEXT, TEXT, st.none(), st.integers(), st.lists(TEXT, max_size=2)))
    if role == "assistant" and draw(st.booleans()):
        message["tool_calls"] = draw(st.one_of(st.lists(TOOL_CALL, max_size=2), st.sampled_from(["call", {}])))
    return message if draw(st.integers(0, 19)) else draw(st.sampled_from(["user: hi", None, ["user", "hi"]]))


PROMPT = st.one_of(TEXT, st.lists(messages(), max_size=4),
                   st.builds(lambda q: [{"role": "user", "content": q}], TEXT), st.none(), st.integers())
DEMONSTRATION = st.one_of(
    TEXT,
    st.builds(lambda text, n: text * n, st.sampled_from(["word ", "é🧪 ", "<think>x</think> "]), st.integers(500, 3000)),
    st.fixed_dictionaries({"content": st.one_of(TEXT, st.none())},
                          optional={"role": st.sampled_from(["assistant", "user"]), "reasoning_content": TEXT,
                                    "tool_calls": st.lists(TOOL_CALL, max_size=2)}),
    st.none(), st.integers(), st.lists(TEXT, max_size=2),
)
TOOLS = st.one_of(st.none(), st.just(""), st.just([]), st.sampled_from(["[", "{}", "[1]", "null"]),
                  st.lists(st.fixed_dictionaries({"type": st.just("function"),
                                                  "function": st.fixed_dictionaries({"name": TEXT})}), max_size=2).map(json.dumps),
                  st.lists(st.one_of(st.dictionaries(TEXT, TEXT, max_size=2), TEXT), max_size=2))


NONEMPTY_TEXT = st.one_of(TRICKY_TEXT, st.text(min_size=1, max_size=40)).filter(lambda text: text.strip())
GOOD_TOOL_CALL = st.builds(
    lambda name, arguments: {"type": "function", "function": {"name": name, "arguments": arguments}},
    st.sampled_from(["get_weather", "search", "дом", "🔧"]),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), TEXT), max_size=3).map(json.dumps))


@st.composite
def plausible_conversations(draw):
    """system? user (assistant-with-tool-calls tool)* : hostile text in a well-formed structure."""
    conversation = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    conversation.append({"role": "user", "content": draw(NONEMPTY_TEXT)})
    for _ in range(draw(st.integers(0, 2))):
        conversation.append({"role": "assistant", "content": draw(TEXT), "tool_calls": draw(st.lists(GOOD_TOOL_CALL, min_size=1, max_size=2))})
        conversation.append({"role": "tool", "content": draw(TEXT)})
    return conversation


PLAUSIBLE_DEMONSTRATION = st.one_of(
    NONEMPTY_TEXT,
    st.builds(lambda text, n: text * n, st.sampled_from(["word ", "é🧪 ", "<think>x</think> y "]), st.integers(200, 3000)),
    st.builds(lambda content, calls: {"role": "assistant", "content": content, "tool_calls": calls},
              TEXT, st.lists(GOOD_TOOL_CALL, min_size=1, max_size=2)),
    st.builds(lambda content, thinking: {"content": content, "reasoning_content": thinking}, NONEMPTY_TEXT, TEXT),
)


@st.composite
def plausible_records(draw):
    prompt = draw(st.one_of(NONEMPTY_TEXT, plausible_conversations()))
    record = {"prompt": prompt, "demonstration": draw(PLAUSIBLE_DEMONSTRATION)}
    if draw(st.booleans()):
        record["tools"] = json.dumps([{"type": "function", "function": {"name": "get_weather", "description": draw(TEXT)}}])
    return record


@st.composite
def plausible_traces(draw):
    trace = draw(plausible_conversations())
    trace.append({"role": "assistant", "content": draw(st.one_of(NONEMPTY_TEXT, st.just("<think>only</think>")))})
    if draw(st.booleans()):  # a second round
        trace += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(NONEMPTY_TEXT)}]
    return trace


def records():
    """Half plausible records with hostile text, half anything at all."""
    return st.one_of(plausible_records(), wild_records())


@st.composite
def wild_records(draw):
    record = {}
    if draw(st.integers(0, 19)):
        record["prompt"] = draw(PROMPT)
    if draw(st.integers(0, 19)):
        record[draw(st.sampled_from(["demonstration", "demonstration", "privileged_context"]))] = draw(DEMONSTRATION)
    if draw(st.booleans()):
        record["tools"] = draw(TOOLS)
    return record


CAPS = st.one_of(
    st.tuples(st.just(4096), st.just(57344)),                       # the defaults
    st.tuples(st.integers(1, 64), st.integers(64, 400)),            # caps that most prompts exceed
    st.tuples(st.integers(20, 300), st.integers(300, 600)),
)


# ------------------------------------------------------------------ properties
def assert_valid_tokens(tokens, tokenizer, max_prompt_length, max_teacher_prompt_length):
    vocab = len(tokenizer)
    for ids in (tokens.input_ids, tokens.teacher_input_ids, tokens.demonstration_ids):
        assert ids and all(isinstance(i, int) and 0 <= i < vocab for i in ids)
    assert len(tokens.input_ids) <= max_prompt_length
    assert len(tokens.teacher_input_ids) <= max_teacher_prompt_length
    assert tokens.teacher_input_ids != tokens.input_ids  # the demonstration is in the teacher's context
    assert tokens.demonstration_ids[-1] == tokenizer.eos_token_id
    assert tokens.teacher_truncated_tokens >= 0
    generation_prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for ids in (tokens.input_ids, tokens.teacher_input_ids):  # both end ready for the answer
        assert ids[-len(generation_prompt):] == generation_prompt


@SETTINGS
@given(record=records(), caps=CAPS, template=st.sampled_from(["paper", "expert_reference", "Q: {question}\nREF: {demonstration}"]),
       truncation=st.sampled_from(["middle", "error"]), row=st.integers(0, 10**6))
def test_every_record_is_tokenized_validly_or_refused_with_its_row(tokenizer, record, caps, template, truncation, row):
    max_prompt_length, max_teacher_prompt_length = caps
    try:
        tokens = tokenize_sdft(tokenizer, sdft_record(record, row, Columns()), template=template,
                               max_prompt_length=max_prompt_length, max_teacher_prompt_length=max_teacher_prompt_length,
                               teacher_truncation=truncation, row=row)
    except RecordError as error:
        assert error.row == row and error.reason and str(error).startswith(f"row {row}: ")
        event(f"refused: {error.reason[:22]}")
        return
    event("tokenized" + (" (teacher prompt cut)" if tokens.teacher_truncated_tokens else ""))
    assert_valid_tokens(tokens, tokenizer, max_prompt_length, max_teacher_prompt_length)


@SETTINGS
@given(trace=st.one_of(plausible_traces(), st.lists(messages(), max_size=6)), tools=TOOLS, row=st.integers(0, 1000))
def test_every_trace_is_split_into_valid_records_or_refused_with_its_row(tokenizer, trace, tools, row):
    try:
        records_of_trace = split_trace(trace, tools, row)
        tokenized = [tokenize_sdft(tokenizer, sdft_record(r, row), row=row) for r in records_of_trace]
    except RecordError as error:
        assert error.row == row and error.reason
        event(f"refused: {error.reason[:22]}")
        return
    event(f"{len(records_of_trace)} record(s)")
    assert records_of_trace and len(tokenized) == len(records_of_trace)
    for tokens in tokenized:
        assert_valid_tokens(tokens, tokenizer, 4096, 57344)


@SETTINGS
@given(batch=st.lists(records(), min_size=1, max_size=6), caps=CAPS)
def test_skip_invalid_keeps_exactly_the_valid_rows_and_writes_the_others(tmp_path_factory, tokenizer, batch, caps):
    options = SDFTOptions(max_prompt_length=caps[0], max_teacher_prompt_length=caps[1], skip_invalid=True)
    expected_valid, expected_invalid = [], {}
    for index, record in enumerate(batch):
        try:
            tokenize_sdft(tokenizer, sdft_record(record, index), max_prompt_length=caps[0],
                          max_teacher_prompt_length=caps[1], row=index)
            expected_valid.append(index)
        except RecordError as error:
            expected_invalid[index] = error.reason
    path = tmp_path_factory.mktemp("invalid") / "invalid_rows.jsonl"
    if not expected_valid:
        with pytest.raises(ValueError, match="no valid rows left|rows are invalid"):
            tokenize_sdft_rows(batch, tokenizer, options, invalid_rows_file=str(path))
        return
    rows = tokenize_sdft_rows(batch, tokenizer, options, invalid_rows_file=str(path))
    assert len(rows) == len(expected_valid)
    written = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    assert {entry["row"]: entry["reason"] for entry in written} == expected_invalid
    strict = SDFTOptions(max_prompt_length=caps[0], max_teacher_prompt_length=caps[1])
    if expected_invalid:  # without skip_invalid the same dataset fails, naming the first bad row
        first = min(expected_invalid)
        with pytest.raises(ValueError, match=f"{len(expected_invalid)} of {len(batch)} rows are invalid \\(row {first}: "):
            tokenize_sdft_rows(batch, tokenizer, strict)


OPTION_VALUES = st.one_of(st.integers(-5, 100_000), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                          st.none(), TEXT, st.sampled_from(["base", "ema", "live", "full_logits", "topk_logits", "sampled_token", "token",
                                                            "sequence", "paper", "middle", "error", "student", "teacher"]),
                          st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, st.integers(), max_size=1))
OPTION_KEYS = st.sampled_from(sorted(f.name for f in dataclasses.fields(SDFTOptions)) + ["distilation_alpha", "Teacher"])


def names_a_key(message: str, block: dict) -> bool:
    # DivergenceOptions' fields are the options' own names, so its messages name the key as given.
    return any(key in message for key in block)


@SETTINGS
@given(block=st.dictionaries(OPTION_KEYS, OPTION_VALUES, max_size=4))
def test_every_option_block_is_accepted_or_refused_naming_a_key(block):
    config = {"trainer_type": "sdft", "sdft": block}
    try:
        parsed = SelfDistillationArgs.model_validate(config)
    except ValueError as error:  # pydantic's ValidationError is a ValueError; nothing else may escape
        event("refused")
        assert names_a_key(str(error), block), str(error)
        return
    event("accepted")
    SDFTOptions(**parsed.sdft).check()  # what the schema accepts, the trainer accepts


@pytest.mark.parametrize("key,value", [
    ("temperature", 0.0),
    ("temperature", float("nan")),
    ("top_p", 1.5),
    ("top_p", 0.0),
    ("top_k", -1),
    ("distillation_temperature", float("nan")),
    ("distillation_temperature", float("inf")),
    ("num_loss_tokens_to_skip", -1),
    ("distillation_is_clip", 0.0),
    ("distillation_is_clip", float("nan")),
    ("teacher_sync_steps", -2),
    ("max_completion_length", 0),
    ("teacher_update_rate", float("nan")),
    ("distillation_alpha", float("nan")),
    ("max_consecutive_nonfinite_steps", 0),
])
def test_out_of_range_option_is_refused_before_training_naming_the_key(key, value):
    block = {key: value, **({"teacher_model_kind": "ema"} if key == "teacher_update_rate" else {})}
    with pytest.raises(ValueError) as refused:
        SelfDistillationArgs.model_validate({"trainer_type": "sdft", "sdft": block})
    assert names_a_key(str(refused.value), {key: value})


# ------------------------------------------------------------------ end to end
def user(text):
    return [{"role": "user", "content": text}]


def answer(content, tool_calls=None):
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}


WEATHER_TOOLS = json.dumps([{"type": "function", "function": {"name": "get_weather"}}])
# One shape per column (Arrow's rule, as for a JSONL file): prompt = messages, demonstration = assistant message.
HOSTILE_BUT_VALID = [
    {"prompt": user("🧪 Quelle est la masse molaire de l'eau ? مرحبا"), "demonstration": answer("18.015 g/mol — « H₂O » ✓")},
    {"prompt": [{"role": "system", "content": "{{ not jinja }} <|im_end|>"}, {"role": "user", "content": "e\u0301\u200b?"}],
     "demonstration": answer("<think>hidden</think>Answer: \x00 ok")},
    {"prompt": user("Call the tool."), "tools": WEATHER_TOOLS, "demonstration": answer("", [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}])},
    {"prompt": user("Summarize."), "demonstration": answer("long " * 2000 + "THE END")},  # cut to fit the teacher cap
]
HOSTILE_AND_INVALID = [
    ({"prompt": [{"role": None, "content": "no role"}], "demonstration": answer("x")}, "message 0 has no valid role"),
    ({"prompt": user("q"), "demonstration": answer("", [{"type": "function", "function": {"name": "f", "arguments": "{'a': 1}"}}])},
     "tool call 'f' has invalid JSON arguments"),
    ({"prompt": user("q " * 400), "demonstration": answer("x")}, "the student prompt has"),
    ({"prompt": user("q"), "demonstration": answer("<think>only thinking</think>")}, "the demonstration is empty"),
    ({"prompt": user("q") + [answer("a")], "demonstration": answer("x")}, "the prompt ends with an assistant message"),
    ({"prompt": user("q"), "tools": "[{", "demonstration": answer("x")}, "tools is not valid JSON"),
]


def test_hostile_dataset_trains_with_skip_invalid_and_reports_the_skipped_rows(tmp_path, tokenizer, caplog):
    raw = [HOSTILE_AND_INVALID[0][0], *HOSTILE_BUT_VALID[:2], *[r for r, _ in HOSTILE_AND_INVALID[1:4]],
           *HOSTILE_BUT_VALID[2:], *[r for r, _ in HOSTILE_AND_INVALID[4:]]]
    raw = [{"tools": None, **record} for record in raw]
    reasons = {0: HOSTILE_AND_INVALID[0][1], **{3 + i: reason for i, (_, reason) in enumerate(HOSTILE_AND_INVALID[1:4])},
               8: HOSTILE_AND_INVALID[4][1], 9: HOSTILE_AND_INVALID[5][1]}
    dataset = Dataset.from_list(raw)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")

    def make_args(**overrides):
        return SDFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                          max_completion_length=6, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                          max_prompt_length=256, max_teacher_prompt_length=512, **overrides)

    with pytest.raises(ValueError, match=r"6 of 10 rows are invalid \(row 0: message 0 has no valid role"):
        SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(), train_dataset=dataset,
                    processing_class=tokenizer, peft_config=lora)
    with caplog.at_level("WARNING", logger="sd_plugin"):
        trainer = SDFTTrainer(model=build_model("qwen3", tokenizer), args=make_args(skip_invalid=True),
                              train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    invalid_file = tmp_path / "out" / "invalid_rows_train.jsonl"
    assert f"skipped 6 invalid rows of 10 (written to {invalid_file})" in caplog.text
    written = [json.loads(line) for line in invalid_file.read_text(encoding="utf-8").splitlines()]
    assert [entry["row"] for entry in written] == sorted(reasons)
    for entry in written:
        assert reasons[entry["row"]] in entry["reason"], entry
        assert entry["record"]["prompt"] == dataset[entry["row"]]["prompt"]
    assert len(trainer.train_dataset) == len(HOSTILE_BUT_VALID)
    assert max(trainer.train_dataset["teacher_truncated_tokens"]) > 0  # the huge demonstration was cut, not refused
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss == result.training_loss  # finite, not NaN
