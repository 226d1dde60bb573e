"""Dataset rows as the trainers read them: the data layer between records (`sd_plugin.data`) and the trainers.

- one builder per kind of row, shared by the trainers' `prepare_dataset`, the Axolotl strategies,
  `collect-revisions` and `generate`: `prompt_row` (SDPO, SD-Zero distill), `sdft_row`, `srt_rows`;
- `tokenize_rows`: a builder over a dataset; invalid rows fail with their index, or with `skip_invalid` go to
  the invalid-rows file (`invalid_rows_path`: one default for every entry point);
- padding (`left_pad`, `right_pad`) and the collator.

Nothing here imports a trainer or `transformers.Trainer`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from sd_plugin.cli import UsageError
from sd_plugin.contexts import AUTO, render_ids, sdzero_delimiter_ids, tokenize_sdft
from sd_plugin.data import Columns, RecordError, prompt_record, sdft_record
from sd_plugin.files import row_fingerprint

LOG = logging.getLogger("sd_plugin")
SRT_COLUMNS = ("y_init", "control_phrase", "y_revised")


# ------------------------------------------------------------------ invalid rows
def invalid_rows_path(options, output_dir: str | None, split: str = "train") -> str:
    """Where `skip_invalid` writes the rows it drops: `invalid_rows_file`, else output_dir/invalid_rows_{split}.jsonl."""
    return getattr(options, "invalid_rows_file", None) or os.path.join(output_dir or ".", f"invalid_rows_{split}.jsonl")


def write_invalid_rows(path: str, entries: list[dict[str, Any]], *, append: bool = False) -> None:
    """One JSON line per dropped row ({"row" or "source", "reason", "record"})."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(entry, default=str) + "\n" for entry in entries))


def tokenize_rows(dataset, tokenize_one, *, skip_invalid: bool, invalid_rows_file: str | None):
    """`tokenize_one(raw, index) -> row` over a dataset; invalid rows fail with their index, or are skipped and saved."""
    from datasets import Dataset

    rows, invalid = [], []
    for index, raw in enumerate(dataset):
        try:
            rows.append(tokenize_one(raw, index))
        except RecordError as error:
            invalid.append((index, error.reason, raw))
    if invalid and len(invalid) == len(dataset):
        # Skipping would drop every row: the data is in another format, not a few bad rows.
        shown = "; ".join(f"row {i}: {reason}" for i, reason, _ in invalid[:3])
        raise ValueError(f"all {len(dataset)} rows are invalid ({shown}): the dataset is not in this trainer's row "
                         "format (README \"Use your own data\": the columns each trainer reads)")
    if invalid and not skip_invalid:
        shown = "; ".join(f"row {i}: {reason}" for i, reason, _ in invalid[:5])
        raise ValueError(f"{len(invalid)} of {len(dataset)} rows are invalid ({shown}); fix them or set skip_invalid=True")
    if invalid:
        path = invalid_rows_file or invalid_rows_path(None, None)
        write_invalid_rows(path, [{"row": index, "reason": reason, "record": raw} for index, reason, raw in invalid])
        LOG.warning("skipped %d invalid rows of %d (written to %s)", len(invalid), len(dataset), path)
    if not rows:
        raise ValueError("no valid rows left in the dataset")
    return Dataset.from_list(rows)


# ------------------------------------------------------------------ one row of each kind
def tokenize_prompt(tokenizer, record: dict, max_prompt_length: int, row: int | None = None) -> list[int]:
    """Chat-template ids of a prompt record (`prompt_record`), refused (never cut) above the cap."""
    ids = render_ids(tokenizer, record["messages"], record["tools"])
    if len(ids) > max_prompt_length:
        raise RecordError(row, f"the prompt has {len(ids)} tokens, over max_prompt_length={max_prompt_length}")
    return ids


def prompt_row(tokenizer, raw: dict, index: int | None, columns: Columns, max_prompt_length: int) -> dict:
    """A prompt-only row ({"prompt", "tools"?, task fields}) -> `input_ids` and `sd_record`.

    `sd_record` is the record as JSON ({"messages", "tools", **task fields}): what teacher contexts and
    verifiers read.
    """
    record = prompt_record(raw, index, columns)
    ids = tokenize_prompt(tokenizer, record, max_prompt_length, index)
    return {"input_ids": ids, "sd_record": json.dumps(record, default=str)}


@dataclass
class PromptRow:
    """A prompt row of a sampling command (generate, collect-revisions), checked and tokenized before any sampling."""

    source_row: int  # position in the input: the key of the attempts log
    line: int  # line of the input file (position + 1 for rows given in Python)
    raw: dict[str, Any]
    record: dict[str, Any]
    prompt_ids: list[int]
    fingerprint: str  # `files.row_fingerprint`: a resumed run must find the same row here


def prepare_prompt_rows(numbered_rows, tokenizer, columns: Columns, max_prompt_length: int, source: str) -> list[PromptRow]:
    """Check and tokenize every `(line, row)` before anything is sampled; the first bad row is a UsageError
    `source:line: reason`."""
    prompts = []
    for index, (line, raw) in enumerate(numbered_rows):
        try:
            record = prompt_record(raw, index, columns)
            ids = tokenize_prompt(tokenizer, record, max_prompt_length, index)
        except RecordError as error:
            raise UsageError(f"{source}:{line}: {error.reason}") from None
        prompts.append(PromptRow(index, line, raw, record, ids, row_fingerprint(raw)))
    return prompts


def sdft_row(tokenizer, raw: dict, index: int | None, columns: Columns, options) -> dict:
    """An SDFT record -> the student prompt, the teacher prompt (with the demonstration) and the demonstration's ids.

    `options` needs `teacher_template`, `max_prompt_length`, `max_teacher_prompt_length`, `teacher_truncation`.
    With `teacher_template: auto` the teacher prompt is rendered with the paper's template for now: the trainer
    picks the template when it starts and renders the teacher prompts again (`SDFTTrainer`). `sd_source_row` is
    the record as JSON under the default column names (what the teacher check and that re-rendering read).
    """
    record = sdft_record(raw, index, columns)
    template = options.teacher_template if options.teacher_template != AUTO else "paper"
    tokens = tokenize_sdft(
        tokenizer, record, template=template,
        max_prompt_length=options.max_prompt_length, max_teacher_prompt_length=options.max_teacher_prompt_length,
        teacher_truncation=options.teacher_truncation, row=index,
    )
    source = {**record.extra, "prompt": record.messages, "demonstration": record.demonstration, "tools": record.tools}
    return {
        "input_ids": tokens.input_ids,
        "teacher_input_ids": tokens.teacher_input_ids,
        "demonstration_ids": tokens.demonstration_ids,
        "teacher_truncated_tokens": tokens.teacher_truncated_tokens,
        "sd_source_row": json.dumps(source, default=str),
    }


def srt_rows(tokenizer, raw: dict, index: int | None, columns: Columns, options) -> list[dict]:
    """The SD-Zero SRT training rows of one kept revision: `input_ids` (context) and `completion_ids` (targets).

    revision row:   context chat(x) + y_init + delimiter     targets y_revised + end-of-turn
    generation row: context chat(x)                          targets y_init + delimiter + y_revised + end-of-turn
    (delimiter = separator + control_phrase + separator). Both rows are the same token sequence; each segment is
    tokenized on its own and the ids are concatenated. A prompt over max_prompt_length or a turn over
    max_completion_length is refused, never cut. `options`: `SDZeroOptions`.
    """
    record = prompt_record(raw, index, columns)
    for key in SRT_COLUMNS:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise RecordError(index, f"{key!r} must be a non-empty string (SRT rows come from sd-plugin collect-revisions), got {str(value)[:60]!r}")
    prompt_ids = tokenize_prompt(tokenizer, record, options.max_prompt_length, index)
    init_ids = tokenizer(record["y_init"], add_special_tokens=False)["input_ids"]
    delimiter_ids = sdzero_delimiter_ids(tokenizer, record["control_phrase"], options.separator)
    # The revision ends its turn as a sampled rollout does: with the end-of-turn (eos) token.
    revised_ids = tokenizer(record["y_revised"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    turn_ids = init_ids + delimiter_ids + revised_ids
    if len(turn_ids) > options.max_completion_length:
        raise RecordError(index, f"the assistant turn y_init + control phrase + y_revised has {len(turn_ids)} tokens, "
                                 f"over max_completion_length={options.max_completion_length}")
    rows = []
    if options.srt_objective in ("joint", "revision"):
        rows.append({"input_ids": prompt_ids + init_ids + delimiter_ids, "completion_ids": revised_ids, "srt_objective": "revision"})
    if options.srt_objective in ("joint", "generation"):
        rows.append({"input_ids": prompt_ids, "completion_ids": turn_ids, "srt_objective": "generation"})
    return rows


def tokenize_prompt_rows(dataset, tokenizer, options, *, invalid_rows_file: str | None = None):
    """Prompt-only records ({"prompt", "tools"?, task fields}) -> rows with `input_ids` and `sd_record` (`prompt_row`).

    `options` needs `prompt_column`, `tools_column`, `max_prompt_length`, `skip_invalid`.
    """
    columns = Columns(prompt=options.prompt_column, tools=options.tools_column)
    return tokenize_rows(dataset, lambda raw, index: prompt_row(tokenizer, raw, index, columns, options.max_prompt_length),
                         skip_invalid=options.skip_invalid, invalid_rows_file=invalid_rows_file)


# ------------------------------------------------------------------ padding
def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
    return ids, mask


class SelfDistillationCollator:
    """Pads the prompt columns on the left (for generation) and keeps other list columns as lists.

    Called as `cls(tokenizer, **kwargs)` by Axolotl too; rows carry `input_ids` (student prompt) and
    whatever the method needs (`teacher_input_ids`, `demonstration_ids`, task fields for verifiers).
    """

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, **unused):
        self.pad_token_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        batch = {}
        batch["input_ids"], batch["attention_mask"] = left_pad([list(r["input_ids"]) for r in rows], self.pad_token_id)
        for key in rows[0]:
            if key not in ("input_ids", "attention_mask", "labels", "position_ids", "length"):
                batch[key] = [r[key] for r in rows]
        return batch
