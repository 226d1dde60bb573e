"""`log_completions`: a sample of what the model does, printed and sent to W&B on each logging step (as TRL's GRPO).

Each row: the student's prompt, its rollout, the teacher context (what the teacher sees that the student
does not: the SDFT demonstration, the SDPO solution and/or feedback, the SD-Zero control phrase) and the
verifier's reward (SDPO, SD-Zero). The trainer records the rollouts of the latest optimizer step as token ids
(cheap) and decodes them only when the log is written.

Model output is hostile: every cell is plain text (rich markup in a completion is shown, not interpreted),
control characters (terminal escapes) are replaced, and long cells are cut in the middle.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from dataclasses import dataclass, field

# Console cells are cut to this many characters (head and tail kept): a 4k-token rollout would fill the
# terminal. The W&B table keeps more, for reading the whole answer; teacher contexts (up to 57k tokens of
# demonstration) are cut there too.
CONSOLE_CELL_CHARS = 400
TABLE_CELL_CHARS = 8000


@dataclass
class CompletionRow:
    """One logged rollout, as token ids until it is written."""

    prompt_ids: list[int]
    completion_ids: list[int]
    teacher_context: str | list[int]  # text (SDPO / SD-Zero) or token ids (the SDFT demonstration)
    reward: float | None


@dataclass
class CompletionsLog:
    """The rows of the latest optimizer step; `write` prints a sample and logs all of them to W&B."""

    num_completions_to_print: int | None
    step: int = -1
    rows: list[CompletionRow] = field(default_factory=list)

    def record(self, step: int, batch, inputs) -> None:
        """Keep the on-policy rows of one micro-batch of optimizer step `step` (an older step's rows are dropped).

        `batch` is the trainer's StepBatch: rows trained with cross-entropy on given text (SDFT's off-policy
        rows, SD-Zero's SRT phase) sampled nothing and are left out.
        """
        if step != self.step:
            self.step, self.rows = step, []
        rollouts = batch.rollouts
        for i in range(len(rollouts.prompt_index)):
            if bool(batch.ce_rows[i]):
                continue
            if batch.teacher_contexts:  # per rollout (SDPO, SD-Zero)
                context = batch.teacher_contexts[i]
            elif "demonstration_ids" in inputs:  # SDFT: the demonstration of the rollout's prompt
                context = list(inputs["demonstration_ids"][int(rollouts.prompt_index[i])])
            else:
                context = ""
            self.rows.append(CompletionRow(
                prompt_ids=batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist(),
                completion_ids=rollouts.completion_ids[i][rollouts.completion_mask[i].bool()].tolist(),
                teacher_context=context,
                reward=None if batch.rewards is None else float(batch.rewards[i]),
            ))

    def write(self, tokenizer, global_step: int, report_to, console=None) -> None:
        """Print a sample of the recorded rows (a rich table when rich is installed) and send all of them to
        W&B as a table when W&B is a reporter with a run; then forget them."""
        if not self.rows:
            return
        table = completions_table(tokenizer, self.rows, global_step)
        self.rows = []
        shown = sample_rows(table["rows"], self.num_completions_to_print, global_step)
        print_completions(table["columns"], shown, global_step, console)
        wandb = wandb_run_module(report_to)
        if wandb is not None:
            wandb.log({"completions": wandb.Table(columns=table["columns"], data=[
                [excerpt(cell, TABLE_CELL_CHARS) if isinstance(cell, str) else cell for cell in row]
                for row in table["rows"]])})


def completions_table(tokenizer, rows: list[CompletionRow], step: int) -> dict:
    """Decoded rows: columns step, prompt, completion, teacher_context (+ reward when any row has one)."""
    with_reward = any(row.reward is not None for row in rows)
    columns = ["step", "prompt", "completion", "teacher_context"] + (["reward"] if with_reward else [])
    decoded = []
    for row in rows:
        context = row.teacher_context
        cells = [step, decode(tokenizer, row.prompt_ids), decode(tokenizer, row.completion_ids),
                 clean(context) if isinstance(context, str) else decode(tokenizer, context)]
        decoded.append(cells + ([row.reward] if with_reward else []))
    return {"columns": columns, "rows": decoded}


def decode(tokenizer, ids: list[int]) -> str:
    return clean(tokenizer.decode(ids, skip_special_tokens=True))


def clean(text: str) -> str:
    """Replace control characters (terminal escapes, carriage returns) except newline and tab."""
    return "".join(ch if ch in "\n\t" or ch.isprintable() else "\ufffd" for ch in text)


def excerpt(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters, keeping its head and tail."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"


def sample_rows(rows: list, count: int | None, step: int) -> list:
    """`count` rows drawn at random (None: all), seeded by the step: the global RNGs, and so the rollouts, are untouched."""
    if count is None or count >= len(rows):
        return rows
    chosen = sorted(random.Random(step).sample(range(len(rows)), count))
    return [rows[i] for i in chosen]


def print_completions(columns: list[str], rows: list[list], step: int, console=None) -> None:
    """A rich table when rich is installed, else plain text, on stdout (or `console`, a rich Console)."""
    cells = [[excerpt(cell, CONSOLE_CELL_CHARS) if isinstance(cell, str) else format_number(cell) for cell in row[1:]]
             for row in rows]
    if not rich_available():
        lines = [f"completions at step {step} ({len(rows)} shown)"]
        for number, row in enumerate(cells, 1):
            lines.append(f"--- {number}")
            lines += [f"{name}: {value}" for name, value in zip(columns[1:], row)]
        print("\n".join(lines), file=sys.stdout, flush=True)
        return
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold white", expand=True, show_lines=True)
    styles = {"prompt": "bright_yellow", "completion": "bright_green", "teacher_context": "bright_cyan", "reward": "bold magenta"}
    for name in columns[1:]:
        table.add_column(name, style=styles.get(name), justify="right" if name == "reward" else "left")
    for row in cells:
        table.add_row(*[Text(value) for value in row])  # Text: markup in model output is shown, never interpreted
    (console or Console()).print(Panel(table, expand=False, title=f"Step {step}", border_style="bold white"))


def rich_available() -> bool:
    return importlib.util.find_spec("rich") is not None


def format_number(value) -> str:
    return "" if value is None else f"{value:.2f}"


def wandb_run_module(report_to) -> object | None:
    """The `wandb` module when W&B is a reporter and a run is open (the Trainer's WandbCallback starts it)."""
    reporters = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in reporters and "all" not in reporters:
        return None
    wandb = sys.modules.get("wandb")
    if wandb is None and importlib.util.find_spec("wandb") is not None:
        import wandb
    return wandb if wandb is not None and getattr(wandb, "run", None) is not None else None
