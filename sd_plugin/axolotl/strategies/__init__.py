"""Dataset strategies for Axolotl's `datasets:` entries.

    datasets:
      - path: data/records.jsonl
        type: sd_plugin.axolotl.strategies.sdft     # {"prompt", "demonstration", "tools"?} rows
        field_human: question                      # optional: the prompt column
        field_model: answer                             # optional: the demonstration column
      - path: data/traces.jsonl
        type: sd_plugin.axolotl.strategies.trace    # {"messages": [...], "tools"?}: one row per assistant turn
        field_messages: conversation                     # optional
      - path: data/problems.jsonl
        type: sd_plugin.axolotl.strategies.prompts  # SDPO / SD-Zero: {"prompt", "system"?, "tools"?, task fields}
        field_human: question                      # optional: the prompt column (field_system: the system column)

Rows become `input_ids` (student prompt; `labels` all -100 so Axolotl's bookkeeping works) plus the
teacher's prompt ids (SDFT) or the record as JSON (`sd_record`, for SDPO / SD-Zero). The caps are checked here, because Axolotl's own length filter only sees `input_ids`.
"""

from __future__ import annotations

import logging

from sd_plugin.data import Columns, RecordError, split_trace
from sd_plugin.rows import invalid_rows_path, prompt_row, sdft_row, write_invalid_rows

LOG = logging.getLogger("sd_plugin")


PLUGIN = "sd_plugin.SelfDistillationPlugin"


def plugin_loaded() -> bool:
    """Whether Axolotl's plugin manager holds the plugin (Axolotl 0.21 also loads it from its entry point
    for configs that do not list it)."""
    try:
        from axolotl.integrations.base import PluginManager
    except ImportError:
        return False
    return any(type(plugin).__name__ == "SelfDistillationPlugin" for plugin in PluginManager.get_instance().plugins.values())


def check_plugin_registered(cfg, dataset_type: str) -> None:
    """Stop before training when the config uses these rows without the plugin's trainer.

    The strategies are plain import paths, so Axolotl loads them whether or not `plugins:` names the plugin;
    without it (or without `trainer_type`) Axolotl trains its own SFT on rows whose labels are all -100: loss 0,
    gradient 0, exit 0, an adapter saved and nothing learned.
    """
    plugins = [str(name) for name in (cfg.get("plugins") or [])]
    if not (any(name.rsplit(".", 1)[-1] == "SelfDistillationPlugin" for name in plugins) or plugin_loaded()):
        raise ValueError(
            f"datasets: type {dataset_type} needs the sd-plugin Axolotl plugin, but this config's plugins: "
            f"{plugins or 'is not set'}; add\n  plugins:\n    - {PLUGIN}\nand trainer_type: sdft | sdpo | sdzero "
            "(without the plugin Axolotl would train its own SFT on these rows: loss 0, nothing learned)"
        )
    if not cfg.get("trainer_type"):
        raise ValueError(
            f"datasets: type {dataset_type} holds self-distillation rows but trainer_type is not set: add "
            "trainer_type: sdft | sdpo | sdzero (without it Axolotl would train its own SFT on these rows: loss 0, "
            "nothing learned)"
        )


def _options(cfg):
    from sd_plugin.axolotl.args import options_class

    method = cfg.get("trainer_type") or "sdft"
    return options_class(method)(**(cfg.get(method) or {}))


class RowStrategy:
    """Batched tokenizing strategy (the interface Axolotl's TokenizedPromptDataset calls); a subclass turns one
    raw row into output rows in `rows_for`. Invalid rows stop preparation with the source and the reason, or
    with `skip_invalid` are written to the invalid-rows file."""

    supports_batched = True
    filter_rows = None
    output_columns: tuple[str, ...] = ()

    def __init__(self, tokenizer, cfg, ds_cfg):
        check_plugin_registered(cfg, (ds_cfg or {}).get("type") or f"{__name__}.{type(self).__name__}")
        self.tokenizer = tokenizer
        self.method = cfg.get("trainer_type") or "sdft"
        self.options = _options(cfg)
        ds_cfg = ds_cfg or {}
        self.source = ds_cfg.get("path", "dataset")
        self.columns = Columns(
            prompt=ds_cfg.get("field_human") or self.options.prompt_column,
            demonstration=ds_cfg.get("field_model") or getattr(self.options, "demonstration_column", "demonstration"),
            tools=ds_cfg.get("field_tools") or self.options.tools_column,
            messages=ds_cfg.get("field_messages") or "messages",
            system=ds_cfg.get("field_system") or "system",
        )
        self.invalid_file = invalid_rows_path(self.options, cfg.get("output_dir"))

    def rows_for(self, row: dict, where: str) -> list[dict]:
        raise NotImplementedError

    def tokenize_prompt(self, batch: dict) -> dict:
        keys = list(batch)
        size = len(batch[keys[0]])
        out = {k: [] for k in ("input_ids", "attention_mask", "labels", *self.output_columns)}
        for i in range(size):
            row = {k: batch[k][i] for k in keys}
            where = f"{self.source}, row with prompt {str(row.get(self.columns.prompt, row))[:60]!r}"
            try:
                produced = self.rows_for(row, where)
            except RecordError as error:
                message = f"{where}: {error.reason}"
                if not self.options.skip_invalid:
                    raise ValueError(f"{message} (fix the row or set skip_invalid: true in the {self.method} block)") from None
                LOG.warning("skipping invalid row: %s", message)
                write_invalid_rows(self.invalid_file, [{"source": self.source, "reason": error.reason, "record": row}], append=True)
                continue
            for item in produced:
                # `labels` all -100: Axolotl's bookkeeping expects them; the loss never reads them.
                out["input_ids"].append(item["input_ids"])
                out["attention_mask"].append([1] * len(item["input_ids"]))
                out["labels"].append([-100] * len(item["input_ids"]))
                for key in self.output_columns:
                    out[key].append(item[key])
        return out


class SDFTStrategy(RowStrategy):
    """SDFT records, or multi-turn traces split per assistant turn (`traces=True`)."""

    output_columns = ("teacher_input_ids", "demonstration_ids", "teacher_truncated_tokens", "sd_source_row")

    def __init__(self, tokenizer, cfg, ds_cfg, traces: bool):
        super().__init__(tokenizer, cfg, ds_cfg)
        self.traces = traces

    def records(self, row: dict, where: str) -> list[dict]:
        if not self.traces:
            return [row]
        if self.columns.messages not in row:
            raise RecordError(None, f"{where}: missing column {self.columns.messages!r} (datasets field_messages); columns present: {sorted(row)}")
        turns = split_trace(row[self.columns.messages], row.get(self.columns.tools))
        return [{self.columns.prompt: t["prompt"], self.columns.demonstration: t["demonstration"], self.columns.tools: t["tools"]} for t in turns]

    def rows_for(self, row: dict, where: str) -> list[dict]:
        return [sdft_row(self.tokenizer, record_row, None, self.columns, self.options) for record_row in self.records(row, where)]


class PromptStrategy(RowStrategy):
    """Prompt-only rows for SDPO / SD-Zero: the chat-template prompt and the record (for verifiers) as JSON."""

    output_columns = ("sd_record",)

    def rows_for(self, row: dict, where: str) -> list[dict]:
        return [prompt_row(self.tokenizer, row, None, self.columns, self.options.max_prompt_length)]
