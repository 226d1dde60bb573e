"""Dataset strategies for Axolotl's `datasets:` entries.

    datasets:
      - path: data/records.jsonl
        type: sd_plugin.axolotl.strategies.sdft     # {"prompt", "demonstration", "tools"?} rows
        field_human: question                      # optional: the prompt column
        field_model: answer                             # optional: the demonstration column
      - path: data/traces.jsonl
        type: sd_plugin.axolotl.strategies.trace    # {"messages": [...], "tools"?}: one row per assistant turn
        field_messages: conversation                     # optional

Rows become `input_ids` (student prompt; `labels` all -100 so Axolotl's bookkeeping works) plus the
teacher's prompt ids. The caps are checked here, because Axolotl's own length filter only sees `input_ids`.
"""

from __future__ import annotations

import json
import logging
import os

from sd_plugin.contexts import tokenize_sdft
from sd_plugin.data import Columns, RecordError, sdft_record, split_trace

LOG = logging.getLogger("sd_plugin")


def _options(cfg):
    from sd_plugin.axolotl.args import options_class

    method = cfg.get("trainer_type") or "sdft"
    return options_class(method)(**(cfg.get(method) or {}))


class SDFTStrategy:
    """Batched tokenizing strategy (the interface Axolotl's TokenizedPromptDataset calls)."""

    supports_batched = True
    filter_rows = None

    def __init__(self, tokenizer, cfg, ds_cfg, traces: bool):
        self.tokenizer, self.traces = tokenizer, traces
        self.options = _options(cfg)
        ds_cfg = ds_cfg or {}
        self.source = ds_cfg.get("path", "dataset")
        self.columns = Columns(
            prompt=ds_cfg.get("field_human") or self.options.prompt_column,
            demonstration=ds_cfg.get("field_model") or self.options.demonstration_column,
            tools=ds_cfg.get("field_tools") or self.options.tools_column,
            messages=ds_cfg.get("field_messages") or "messages",
        )
        self.invalid_file = self.options.invalid_rows_file or os.path.join(cfg.get("output_dir") or ".", "invalid_rows.jsonl")

    def records(self, row: dict, where: str) -> list[dict]:
        if not self.traces:
            return [row]
        if self.columns.messages not in row:
            raise RecordError(None, f"{where}: missing column {self.columns.messages!r} (datasets field_messages); columns present: {sorted(row)}")
        turns = split_trace(row[self.columns.messages], row.get(self.columns.tools))
        return [{self.columns.prompt: t["prompt"], self.columns.demonstration: t["demonstration"], self.columns.tools: t["tools"]} for t in turns]

    def tokenize_prompt(self, batch: dict) -> dict:
        keys = list(batch)
        size = len(batch[keys[0]])
        out = {k: [] for k in ("input_ids", "attention_mask", "labels", "teacher_input_ids", "demonstration_ids", "teacher_truncated_tokens")}
        for i in range(size):
            row = {k: batch[k][i] for k in keys}
            where = f"{self.source}, row with prompt {str(row.get(self.columns.prompt, row))[:60]!r}"
            try:
                for record_row in self.records(row, where):
                    record = sdft_record(record_row, None, self.columns)
                    tokens = tokenize_sdft(
                        self.tokenizer, record, template=self.options.teacher_template,
                        max_prompt_length=self.options.max_prompt_length,
                        max_teacher_prompt_length=self.options.max_teacher_prompt_length,
                        teacher_truncation=self.options.teacher_truncation,
                    )
                    out["input_ids"].append(tokens.input_ids)
                    out["attention_mask"].append([1] * len(tokens.input_ids))
                    out["labels"].append([-100] * len(tokens.input_ids))
                    out["teacher_input_ids"].append(tokens.teacher_input_ids)
                    out["demonstration_ids"].append(tokens.demonstration_ids)
                    out["teacher_truncated_tokens"].append(tokens.teacher_truncated_tokens)
            except RecordError as error:
                message = f"{where}: {error.reason}"
                if not self.options.skip_invalid:
                    raise ValueError(f"{message} (fix the row or set skip_invalid: true in the {'trace' if self.traces else 'sdft'} block)") from None
                LOG.warning("skipping invalid row: %s", message)
                with open(self.invalid_file, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"source": self.source, "reason": error.reason, "record": row}, default=str) + "\n")
        return out
