"""Teacher contexts: what the teacher sees that the student does not, rendered to token ids.

- SDFT: the conversation with the expert demonstration placed in context (`sdft_teacher_messages`).
- SDPO: the prompt plus a successful sibling rollout and/or the verifier's feedback (`sdpo_teacher_messages`).
- SD-Zero: the prompt, the response, a control phrase, and the response again (`sdzero_teacher_ids`).

Student and teacher prompts are rendered through the tokenizer's chat template (tool schemas included);
completions are appended as token ids, never re-tokenized from text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sd_plugin.data import THINK_BLOCK, RecordError, SDFTRecord

# The SDFT paper's template (filled into the last user message).
PAPER_TEMPLATE = (
    "{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)
# The Qwen3.5 SDFT card's variant: the expert turn in an <expert_reference> block, here appended to the
# system message so that multi-turn agentic prompts (ending in a tool result) keep their structure.
EXPERT_REFERENCE_TEMPLATE = (
    "<expert_reference>\n{demonstration}\n</expert_reference>\n"
    "The block above is an expert's response to the last turn of this conversation. "
    "Use it as a reference, and write a response of your own."
)
# Short templates that say what the demonstration is: a small model (135M) does the task in context under
# them where it writes prose under the two above (benchmarks/README.md, "Teacher templates on two tasks").
COPY_TEMPLATE = "{question}\n\nReply with exactly this text and nothing else:\n{demonstration}"
LIKE_THIS_TEMPLATE = "{question}\n\nAnswer exactly like this:\n{demonstration}"
SAME_FORMAT_TEMPLATE = "{question}\n\nHere is the correct answer:\n{demonstration}\n\nWrite it in exactly the same form."
SYSTEM_ANSWER_TEMPLATE = "Reply to the user with exactly this text and nothing else:\n{demonstration}"
TEMPLATES = {"paper": PAPER_TEMPLATE, "expert_reference": EXPERT_REFERENCE_TEMPLATE, "copy": COPY_TEMPLATE,
             "like_this": LIKE_THIS_TEMPLATE, "same_format": SAME_FORMAT_TEMPLATE, "system_answer": SYSTEM_ANSWER_TEMPLATE}
# `teacher_template: auto` scores these (and the user's teacher_template_candidates) on a sample of training rows
# and trains with the best (sd_plugin.teacher_check).
AUTO_CANDIDATES = tuple(TEMPLATES)
AUTO = "auto"
TRUNCATION_MARKER = "\n[... middle of the reference cut to fit the context ...]\n"

SDPO_SOLUTION = "\nCorrect solution:\n\n{solution}"
SDPO_FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}"
SDPO_SUFFIX = "\n\nCorrectly solve the original question."


def resolve_template(template: str) -> str:
    """A template name ("paper", "expert_reference") or a custom string with {demonstration}."""
    text = TEMPLATES.get(template, template)
    if "{demonstration}" not in text:
        raise ValueError(
            f"teacher_template {template!r} is neither a known name ({', '.join(TEMPLATES)}) "
            "nor a string containing {demonstration}"
        )
    return text


def template_name(template: str) -> str:
    """A template's name: its built-in name, or for a custom string "custom:" and its first words."""
    if template in TEMPLATES or template == AUTO:
        return template
    for name, text in TEMPLATES.items():
        if text == template:
            return name
    words = " ".join(template.replace("{question}", "").replace("{demonstration}", "").split())
    return f"custom:{words[:32]}"


def fill(template: str, **values: str) -> str:
    """Substitute `{name}` placeholders in one pass: a value that itself contains `{question}` (an f-string
    in a code demonstration) is left as it is, and braces that name no value stay literal."""
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in values))
    return pattern.sub(lambda match: values[match.group(0)[1:-1]], template)


def render_ids(tokenizer, messages: list[dict[str, Any]], tools=None, *, add_generation_prompt=True) -> list[int]:
    """Chat-template token ids of `messages` (with the assistant generation prompt by default)."""
    text = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def demonstration_text(tokenizer, record: SDFTRecord) -> str:
    """The expert turn as the teacher should read it: its content, tool calls rendered by the chat template."""
    message = record.demonstration
    if not message.get("tool_calls"):
        return message["content"]
    prefix = tokenizer.apply_chat_template(record.messages, tools=record.tools, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(record.messages + [message], tools=record.tools, tokenize=False)
    if not full.startswith(prefix):
        raise RecordError(None, "the chat template renders the conversation differently once the expert turn is added")
    text = full[len(prefix):]
    end = text.rfind(tokenizer.eos_token) if tokenizer.eos_token else -1
    return (text[:end] if end >= 0 else text).strip()


def demonstration_ids(tokenizer, record: SDFTRecord) -> list[int]:
    """Token ids of the expert turn as an assistant response (through the end-of-turn token), for SFT rows."""
    prompt_ids = render_ids(tokenizer, record.messages, record.tools)
    full_ids = render_ids(tokenizer, record.messages + [record.demonstration], record.tools, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise RecordError(None, "the chat template's generation prompt is not a prefix of the rendered expert turn")
    response = full_ids[len(prompt_ids):]
    if tokenizer.eos_token_id in response:
        response = response[: response.index(tokenizer.eos_token_id) + 1]
    return response


def sdft_teacher_messages(messages: list[dict[str, Any]], demonstration: str, template: str) -> list[dict[str, Any]]:
    """The conversation with the demonstration in context (last user message, or the system message)."""
    template = resolve_template(template)
    messages = [dict(m) for m in messages]
    if "{question}" in template:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None or not isinstance(messages[last_user].get("content"), str):
            raise RecordError(None, "the template needs {question} but the prompt has no text user message")
        messages[last_user]["content"] = fill(template, demonstration=demonstration, question=messages[last_user]["content"])
        return messages
    block = fill(template, demonstration=demonstration)
    if messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{block}"
    else:
        messages.insert(0, {"role": "system", "content": block})
    return messages


@dataclass
class TokenizedSDFT:
    input_ids: list[int]            # student prompt
    teacher_input_ids: list[int]    # teacher prompt (demonstration in context)
    demonstration_ids: list[int]    # the expert turn as a response (for off-policy SFT rows)
    teacher_truncated_tokens: int   # demonstration tokens cut from the teacher prompt to fit


def tokenize_sdft(
    tokenizer,
    record: SDFTRecord,
    *,
    template: str = "paper",
    max_prompt_length: int = 4096,
    max_teacher_prompt_length: int = 57344,
    teacher_truncation: str = "middle",
    row: int | None = None,
) -> TokenizedSDFT:
    """Student and teacher prompt ids for one record, checked against the caps.

    The student prompt is never cut (too long -> RecordError). The teacher prompt is brought under its cap
    by cutting the middle of the demonstration (teacher_truncation="middle") or refused ("error"); the
    question and the rest of the conversation are never cut.
    """
    student_ids = render_ids(tokenizer, record.messages, record.tools)
    if len(student_ids) > max_prompt_length:
        raise RecordError(row, f"the student prompt has {len(student_ids)} tokens, over max_prompt_length={max_prompt_length}")
    try:
        demo = demonstration_text(tokenizer, record)
        demo_ids = demonstration_ids(tokenizer, record)
    except RecordError as error:
        raise RecordError(row, error.reason) from None

    def teacher_ids_for(text: str) -> list[int]:
        try:
            return render_ids(tokenizer, sdft_teacher_messages(record.messages, text, template), record.tools)
        except RecordError as error:
            raise RecordError(row, error.reason) from None

    teacher_ids = teacher_ids_for(demo)
    truncated = 0
    if len(teacher_ids) > max_teacher_prompt_length:
        if teacher_truncation != "middle":
            raise RecordError(
                row,
                f"the teacher prompt has {len(teacher_ids)} tokens, over max_teacher_prompt_length="
                f"{max_teacher_prompt_length} (set teacher_truncation='middle' to cut the demonstration's middle)",
            )
        teacher_ids, truncated = _cut_demonstration_middle(tokenizer, demo, teacher_ids_for, max_teacher_prompt_length, row)
    return TokenizedSDFT(student_ids, teacher_ids, demo_ids, truncated)


def _cut_demonstration_middle(tokenizer, demo: str, teacher_ids_for, cap: int, row):
    demo_tokens = tokenizer(demo, add_special_tokens=False)["input_ids"]
    overflow = len(teacher_ids_for(demo)) - cap
    # Re-rendering can shift a few tokens at the cut: shrink a little more until it fits.
    for slack in (8, 32, 128, 512):
        keep = len(demo_tokens) - overflow - slack
        if keep <= 0:
            break
        head, tail = keep // 2, keep - keep // 2
        cut = tokenizer.decode(demo_tokens[:head]) + TRUNCATION_MARKER + tokenizer.decode(demo_tokens[-tail:])
        ids = teacher_ids_for(cut)
        if len(ids) <= cap:
            return ids, len(demo_tokens) - keep
    without_demo = len(teacher_ids_for(TRUNCATION_MARKER))
    raise RecordError(
        row,
        f"the teacher prompt does not fit max_teacher_prompt_length={cap} even with the demonstration cut to "
        f"nothing ({without_demo} tokens without it); the question is never cut: raise the cap or drop the row",
    )


def strip_thinking(text: str) -> str:
    """The text without reasoning: <think>...</think> blocks, and everything up to a lone </think> (chat
    templates that open <think> in the generation prompt produce completions that start inside the thought)."""
    text = THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()


def sdpo_teacher_messages(
    messages: list[dict[str, Any]], solution: str | None, feedback: str | None
) -> list[dict[str, Any]] | None:
    """SDPO's reprompt of the last user message; None when there is neither a solution nor feedback."""
    if solution is None and feedback is None:
        return None
    messages = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    text = messages[last_user]["content"]
    if solution is not None:
        text += fill(SDPO_SOLUTION, solution=strip_thinking(solution))
    if feedback is not None:
        text += fill(SDPO_FEEDBACK, feedback=feedback)
    messages[last_user]["content"] = text + SDPO_SUFFIX
    return messages


# SD-Zero's outcome-conditioned control phrases P_r per model family (official code, _P_R_PHRASES): the reviser
# continues after "y + separator + P_r + separator". Collection, SRT data and the distill teacher must agree.
CONTROL_PHRASES = {
    "qwen": {"correct": "Let me rephrase the above solution.",
             "incorrect": "Wait, this response is wrong. Let me correct it."},
    "olmo": {"correct": "Let me rephrase the above solution.",
             "incorrect": "Wrong. I need to redo all."},
}


def control_phrases(family: str = "qwen", correct: str | None = None, incorrect: str | None = None) -> dict[bool, str]:
    """The control phrase for each verifier outcome ({True: correct, False: incorrect}): the family's, or overrides."""
    if family not in CONTROL_PHRASES:
        raise ValueError(f"control_phrase_family must be one of {sorted(CONTROL_PHRASES)}, got {family!r}")
    phrases = {True: correct or CONTROL_PHRASES[family]["correct"], False: incorrect or CONTROL_PHRASES[family]["incorrect"]}
    for outcome, phrase in phrases.items():
        if not phrase.strip():
            raise ValueError(f"the control phrase for {'correct' if outcome else 'incorrect'} responses is empty")
    return phrases


def sdzero_delimiter_ids(tokenizer, control_phrase: str, separator: str = "\n\n") -> list[int]:
    """Token ids of separator + P_r + separator, tokenized as one segment (as the official code does)."""
    return tokenizer(f"{separator}{control_phrase}{separator}", add_special_tokens=False)["input_ids"]


@dataclass
class SDZeroTeacherIds:
    teacher_input_ids: list[int]  # chat(x) + y[:scored_length] (without its end-of-turn token) + delimiter
    scored_length: int            # tokens of y the teacher scores as its second copy (= the student's loss tokens)
    truncated_tokens: int         # tokens of y dropped from each copy to fit the cap (0: not shortened)


def sdzero_teacher_ids(
    prompt_ids: list[int],
    response_ids: list[int],
    delimiter_ids: list[int],
    *,
    max_length: int,
    end_of_turn_ids: tuple[int, ...] | list[int] = (),
) -> SDZeroTeacherIds | None:
    """SD-Zero's teacher input chat(x) + y + separator P_r separator + y; the caller appends the second copy of y.

    `response_ids` is the sampled y (ending with its end-of-turn token when it stopped); the first copy plays
    the SRT data's y_init, which is text without an end-of-turn token, so a trailing one in `end_of_turn_ids`
    is left out of it. The loss covers the second copy only. When |x| + |first copy| + |delimiter| + |y| is over
    `max_length`, y is shortened symmetrically: both copies become y[:L] with L = (max_length - |x| -
    |delimiter|) // 2, so the student is trained on those L tokens only. x is never cut: when not even one
    token of y fits, the result is None (the row gets no teacher signal).
    """
    first_copy = list(response_ids)
    if first_copy and first_copy[-1] in end_of_turn_ids:
        first_copy = first_copy[:-1]
    total = len(prompt_ids) + len(first_copy) + len(delimiter_ids) + len(response_ids)
    if total <= max_length:
        return SDZeroTeacherIds(list(prompt_ids) + first_copy + list(delimiter_ids), len(response_ids), 0)
    kept = (max_length - len(prompt_ids) - len(delimiter_ids)) // 2
    if kept < 1:
        return None
    return SDZeroTeacherIds(list(prompt_ids) + list(response_ids[:kept]) + list(delimiter_ids), kept,
                            len(response_ids) - kept)
