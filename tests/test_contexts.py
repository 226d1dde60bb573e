"""Teacher contexts and record handling, token by token."""

import pytest

from sd_plugin.contexts import PAPER_TEMPLATE, render_ids, sdft_teacher_messages, sdpo_teacher_messages, tokenize_sdft
from sd_plugin.data import RecordError, sdft_record, split_trace

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_paper_template_fills_the_last_user_message():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "What is {x}?"}]
    teacher = sdft_teacher_messages(messages, "DEMO {y}", "paper")
    expected = PAPER_TEMPLATE.replace("{demonstration}", "DEMO {y}").replace("{question}", "What is {x}?")
    assert teacher[-1]["content"] == expected
    assert teacher[:3] == messages[:3] and messages[-1]["content"] == "What is {x}?"


def test_expert_reference_goes_into_the_system_message():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
                {"role": "tool", "content": "result"}]
    teacher = sdft_teacher_messages(messages, "expert says", "expert_reference")
    assert teacher[0]["role"] == "system" and "<expert_reference>\nexpert says\n</expert_reference>" in teacher[0]["content"]
    assert teacher[1:] == messages


def test_custom_template_without_demonstration_is_rejected():
    with pytest.raises(ValueError, match="demonstration"):
        sdft_teacher_messages([{"role": "user", "content": "q"}], "d", "no placeholder here")


def test_tool_schemas_and_tool_call_demonstrations_render_through_the_chat_template(tokenizer):
    record = sdft_record({
        "prompt": [{"role": "user", "content": "Weather in Paris?"}],
        "demonstration": {"role": "assistant", "content": "", "reasoning_content": "SECRET THOUGHTS",
                          "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        "tools": TOOLS,
    })
    tokens = tokenize_sdft(tokenizer, record, template="paper")
    student = tokenizer.decode(tokens.input_ids)
    teacher = tokenizer.decode(tokens.teacher_input_ids)
    assert '"name": "get_weather"' in student  # the schema, through the template
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in teacher
    assert "SECRET" not in teacher and "Paris\"}}</tool_call>" not in student
    assert tokenizer.decode(tokens.demonstration_ids).endswith("</tool_call><|im_end|>")


def test_think_blocks_are_removed_from_demonstrations():
    record = sdft_record({"prompt": "q", "demonstration": "<think>private</think>The answer."})
    assert record.demonstration["content"] == "The answer."


def test_privileged_context_column_is_accepted():
    record = sdft_record({"prompt": "q", "privileged_context": "demo"})
    assert record.demonstration["content"] == "demo"


@pytest.mark.parametrize(
    "row,match",
    [
        ({"prompt": [{"content": "no role"}], "demonstration": "d"}, "message 0 has no valid role"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "demonstration": "d"}, "no user"),
        ({"prompt": "q", "demonstration": {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}}, "invalid JSON"),
        ({"prompt": "q", "demonstration": "d", "tools": "[not json"}, "tools is not valid JSON"),
        ({"prompt": "q", "demonstration": 3}, "demonstration must be"),
    ],
)
def test_invalid_records_name_the_row_and_reason(row, match):
    with pytest.raises(RecordError, match=f"row 7: .*{match}"):
        sdft_record(row, 7)


def test_multi_turn_trace_splits_into_one_record_per_assistant_turn():
    trace = [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "Fix the bug."},
        {"role": "assistant", "content": "Looking.", "reasoning_content": "hidden",
         "tool_calls": [{"function": {"name": "read", "arguments": {"path": "a.py"}}}]},
        {"role": "tool", "content": "print(1"},
        {"role": "assistant", "content": "Fixed the paren."},
    ]
    records = split_trace(trace, tools=TOOLS)
    assert [r["turn"] for r in records] == [2, 4]
    assert records[0]["prompt"] == trace[:2]
    assert records[1]["prompt"][-1] == {"role": "tool", "content": "print(1"}
    assert records[1]["demonstration"]["content"] == "Fixed the paren."
    assert "reasoning_content" not in records[0]["demonstration"]
    assert all(r["tools"] == TOOLS for r in records)


def test_sdpo_reprompt_has_solution_and_feedback_exactly_when_given():
    messages = [{"role": "user", "content": "Q"}]
    assert sdpo_teacher_messages(messages, None, None) is None
    both = sdpo_teacher_messages(messages, "<think>t</think>SOL", "FB")[-1]["content"]
    assert both == ("Q\nCorrect solution:\n\nSOL\nThe following is feedback from your unsuccessful earlier attempt:\n\nFB"
                    "\n\nCorrectly solve the original question.")
    only_feedback = sdpo_teacher_messages(messages, None, "FB")[-1]["content"]
    assert "Correct solution" not in only_feedback and "FB" in only_feedback


def test_render_ids_match_the_chat_template_text(tokenizer):
    messages = [{"role": "user", "content": "hello"}]
    ids = render_ids(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == text and text.endswith("<|im_start|>assistant\n")
