"""Record formats and validation.

An SDFT record is {"prompt": str | messages, "demonstration": str | assistant message, "tools": optional}.
Column names are configurable; TRL's `privileged_context` is accepted as the demonstration. Multi-turn
agentic traces ({"messages": [...]} with several assistant turns and tool calls/results) become one
record per assistant turn with `split_trace`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# Reasoning traces of a demonstration are not shown to the teacher (seeds/001: private reasoning fields).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class RecordError(ValueError):
    """A dataset row that cannot be used, with its index and the reason."""

    def __init__(self, row: int | None, reason: str):
        self.row, self.reason = row, reason
        super().__init__(f"row {row}: {reason}" if row is not None else reason)


@dataclass
class Columns:
    """Which dataset columns hold the prompt, the demonstration and the tool schemas."""

    prompt: str = "prompt"
    demonstration: str = "demonstration"
    tools: str = "tools"
    messages: str = "messages"
    system: str = "system"


@dataclass
class SDFTRecord:
    messages: list[dict[str, Any]]
    demonstration: dict[str, Any]
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def as_messages(prompt: Any, row: int | None = None) -> list[dict[str, Any]]:
    """A prompt as chat messages: a string becomes one user turn; messages are checked."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError(row, "the prompt is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise RecordError(row, f"the prompt must be a string or a non-empty list of messages, got {type(prompt).__name__}")
    messages = []
    for turn, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RecordError(row, f"message {turn} has no valid role (expected one of {ROLES}): {str(message)[:80]!r}")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise RecordError(row, f"message {turn} ({message['role']}) has no content")
        if content is not None and not isinstance(content, str) and not (
                isinstance(content, list) and all(isinstance(part, dict) for part in content)):
            raise RecordError(row, f"message {turn} ({message['role']}): content must be a string or a list of content "
                                   f"parts (dicts), got {type(content).__name__}: {str(content)[:80]!r}")
        if message.get("tool_calls"):
            check_tool_calls(message["tool_calls"], row, f"message {turn}")
        messages.append({k: v for k, v in message.items() if v is not None})
    if not any(m["role"] in ("user", "tool") for m in messages):
        raise RecordError(row, "the prompt has no user (or tool) message")
    if messages[-1]["role"] == "assistant":
        raise RecordError(row, "the prompt ends with an assistant message: nothing is left for the model to answer")
    return messages


def check_tool_calls(tool_calls: Any, row: int | None, where: str) -> None:
    """`where` names the message in errors ("message 2", "the demonstration")."""
    if not isinstance(tool_calls, list):
        raise RecordError(row, f"{where}: tool_calls must be a list")
    for call in tool_calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise RecordError(row, f"{where}: a tool call has no function name: {str(call)[:80]!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                json.loads(arguments)
            except json.JSONDecodeError as error:
                raise RecordError(row, f"{where}: tool call {function['name']!r} has invalid JSON arguments ({error})") from None


def clean_demonstration(demonstration: Any, row: int | None = None) -> dict[str, Any]:
    """The demonstration as an assistant message without reasoning fields or <think> blocks."""
    if isinstance(demonstration, str):
        message = {"role": "assistant", "content": demonstration}
    elif isinstance(demonstration, dict):
        message = {k: v for k, v in demonstration.items() if k not in REASONING_KEYS and v is not None}
        message["role"] = "assistant"
        if message.get("tool_calls"):
            check_tool_calls(message["tool_calls"], row, "the demonstration")
    else:
        raise RecordError(row, f"the demonstration must be a string or an assistant message, got {type(demonstration).__name__}")
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise RecordError(row, "the demonstration's content must be a string")
    message["content"] = THINK_BLOCK.sub("", content).strip()
    if not message["content"] and not message.get("tool_calls"):
        raise RecordError(row, "the demonstration is empty")
    return message


def parse_tools(tools: Any, row: int | None = None) -> list[dict[str, Any]] | None:
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise RecordError(row, f"tools is not valid JSON ({error})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError(row, "tools must be a list of JSON tool schemas")
    return tools


def sdft_record(row: dict[str, Any], index: int | None = None, columns: Columns | None = None) -> SDFTRecord:
    """Validate one dataset row and return it as an SDFTRecord (raises RecordError with the row index)."""
    columns = columns or Columns()
    if columns.prompt not in row:
        raise RecordError(index, f"missing column {columns.prompt!r} (columns present: {sorted(row)})")
    demonstration_key = columns.demonstration
    if demonstration_key not in row and "privileged_context" in row:
        demonstration_key = "privileged_context"
    if demonstration_key not in row:
        raise RecordError(index, f"missing column {columns.demonstration!r} (columns present: {sorted(row)})")
    known = {columns.prompt, demonstration_key, columns.tools}
    return SDFTRecord(
        messages=as_messages(row[columns.prompt], index),
        demonstration=clean_demonstration(row[demonstration_key], index),
        tools=parse_tools(row.get(columns.tools), index),
        extra={k: v for k, v in row.items() if k not in known},
    )


def prompt_record(row: dict[str, Any], index: int | None = None, columns: Columns | None = None) -> dict[str, Any]:
    """A prompt-only row (SDPO, SD-Zero) as {"messages", "tools", **task fields}; raises RecordError.

    A string prompt becomes a user turn, preceded by the row's `system` column when it has one (the
    SciKnowEval rows carry their answer-format instructions there). Other columns (`answer`, `tests`, ...)
    stay in the record for the verifier.
    """
    columns = columns or Columns()
    if columns.prompt not in row:
        raise RecordError(index, f"missing column {columns.prompt!r} (columns present: {sorted(row)})")
    messages = as_messages(row[columns.prompt], index)
    system = row.get(columns.system)
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system.strip()})
    known = {columns.prompt, columns.tools, columns.system}
    return {"messages": messages, "tools": parse_tools(row.get(columns.tools), index),
            **{k: v for k, v in row.items() if k not in known}}


def split_trace(messages: list[dict[str, Any]], tools: Any = None, row: int | None = None) -> list[dict[str, Any]]:
    """One SDFT row per assistant turn of a multi-turn trace: the conversation before it, and the turn.

    Tool calls and tool results earlier in the trace stay in the prompt, so each turn is learned with the
    context the expert had. Assistant turns that are empty once reasoning is removed are skipped.
    """
    if not isinstance(messages, list):
        raise RecordError(row, "messages must be a list")
    records = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant" or turn == 0:
            continue
        try:
            demonstration = clean_demonstration(message, row)
            prompt = as_messages(messages[:turn], row)
        except RecordError as error:
            if error.reason in ("the demonstration is empty",):
                continue
            raise
        records.append({"prompt": prompt, "demonstration": demonstration, "tools": tools, "turn": turn})
    if not records:
        raise RecordError(row, "the trace has no assistant turn after a user message")
    return records


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a completion: the tokenizer's eos plus the model's generation_config eos ids."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = extra if isinstance(extra, list) else [extra]
    return sorted({e for e in [tokenizer.eos_token_id, *extra] if e is not None})


def completion_text(tokenizer, ids: list[int], end_of_turn: list[int]) -> str:
    """A completion's text as a verifier should read it: only end-of-turn ids are dropped.

    `skip_special_tokens=True` would also drop tokens a tokenizer marks special but that carry the answer
    (<tool_call>, <think>, </think>): a correct tool call would then score 0.
    """
    return tokenizer.decode([t for t in ids if t not in end_of_turn], skip_special_tokens=False)
