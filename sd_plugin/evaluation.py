"""Evaluation during training: greedy answers to held-out prompts, scored by a verifier, before, during, after.

Two prompt sets, each a JSONL of prompt records (the prompt column, optional `system` / `tools`, and the
fields the verifier reads, e.g. `answer`):
- `eval_prompts` + `eval_verifier`: the task being trained (held out from the training data);
- `prior_prompts` + `prior_verifier`: questions the base model already answers, so that forgetting is a number.

Each set is answered greedily (the model's own chat template, `eval_max_new_tokens` tokens at most) at step
0, every `eval_generation_steps` steps and at the end. Logged as `eval_{set}_reward` (mean reward),
`eval_{set}_pass_rate` (reward >= 1), `eval_{set}_format_rate` (when the verifier has a
`format_score(prompt, completion, record)` method) and `eval_{set}_completion_length` (tokens), through the
trainer's reporters (W&B, TensorBoard, the console), and printed at the end as a before/after table.
Answers are model output: the verifier is called through `safe_verify`, so a verifier that raises scores 0.

Decoding is the rollouts': one explicit GenerationConfig (`sd_plugin.rollout.generation_config`), so nothing of
the checkpoint's generation_config.json (repetition_penalty, no_repeat_ngram_size, ...) changes "greedy". The
verifier reads the text training's verifiers read (`sd_plugin.data.completion_text`: end-of-turn ids dropped,
every other token kept, special ones such as <tool_call> included), so a task scores the same text in both.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from sd_plugin.data import Columns, RecordError, completion_text, prompt_record
from sd_plugin.files import read_jsonl_rows
from sd_plugin.rollout import SamplingOptions, generate_rollouts
from sd_plugin.rows import left_pad, tokenize_prompt
from sd_plugin.verifiers import load_verifier, safe_verify

LOG = logging.getLogger("sd_plugin")
METRICS = ("reward", "pass_rate", "format_rate", "completion_length")


def read_prompt_set(path: str, prompt_column: str = "prompt") -> list[dict]:
    """Prompt records from a JSONL file; a bad line or row fails with the file, line and reason."""
    records = []
    for line_number, raw in read_jsonl_rows(path):  # the commands' reader: a line that is no JSON object raises
        try:
            records.append(prompt_record(raw, line_number, Columns(prompt=prompt_column)))
        except RecordError as error:
            raise ValueError(f"{path}:{line_number}: {error.reason}") from None
    if not records:
        raise ValueError(f"{path}: no prompt records")
    return records


def answers(model, prompts: list[list[int]], options: SamplingOptions, eos_token_ids: list[int], pad_token_id: int,
            batch_size: int = 16) -> list[list[int]]:
    """`options.num_generations` completion ids per prompt (prompt-major; through the first eos, included), in
    left-padded batches of `batch_size` prompts.

    The call is the rollouts' (`generate_rollouts`, one explicit GenerationConfig): greedy with
    `do_sample=False`, and nothing of the checkpoint's generation_config.json (repetition_penalty, ...) applies.
    """
    device = next(model.parameters()).device
    found = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], pad_token_id)
        rollouts = generate_rollouts(model, ids.to(device), mask.to(device), options, eos_token_ids, pad_token_id)
        for row, length in zip(rollouts.completion_ids.tolist(), rollouts.completion_mask.sum(-1).tolist()):
            found.append(row[:length])
    return found


def answer_tokens(ids: list[int], eos_token_ids: list[int]) -> list[int]:
    """An answer's tokens without its end-of-turn token (what `completion_length` counts)."""
    return ids[:-1] if ids and ids[-1] in eos_token_ids else ids


def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: list[int],
                   batch_size: int = 16) -> list[list[int]]:
    """Greedy completion ids (through the first eos, included) for each prompt."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, do_sample=False)
    return answers(model, prompts, options, eos_token_ids, tokenizer.pad_token_id, batch_size)


class PromptSet:
    """One named prompt set with its verifier: rendered once, scored on demand."""

    def __init__(self, name: str, path: str, verifier_spec: str, tokenizer, prompt_column: str, max_prompt_length: int):
        self.name, self.path = name, path
        self.records = read_prompt_set(path, prompt_column)
        self.verifier = load_verifier(verifier_spec)
        self.prompts = []
        for line_number, record in enumerate(self.records, 1):
            try:
                self.prompts.append(tokenize_prompt(tokenizer, record, max_prompt_length, line_number))
            except RecordError as error:
                raise ValueError(f"{path}:{line_number}: {error.reason}") from None

    def score(self, model, tokenizer, max_new_tokens: int, eos_token_ids: list[int]) -> tuple[dict[str, float], list[str]]:
        """Mean metrics of greedy answers (see the module doc) and the answers' text."""
        found = greedy_answers(model, tokenizer, self.prompts, max_new_tokens, eos_token_ids)
        # The verifiers' one decoding rule (training's too): only end-of-turn ids are dropped, so a tool-call
        # task scores the same text here as in SDPO / SD-Zero training (special tokens such as <tool_call> stay).
        texts = [completion_text(tokenizer, ids, eos_token_ids) for ids in found]
        rewards, formats = [], []
        for row, (record, text) in enumerate(zip(self.records, texts)):
            task_fields = {k: v for k, v in record.items() if k not in ("messages", "tools")}
            rewards.append(safe_verify(self.verifier, record["messages"], text, task_fields, row=row).reward)
            if hasattr(self.verifier, "format_score"):
                try:
                    formats.append(float(self.verifier.format_score(record["messages"], text, task_fields)))
                except Exception:  # a verifier bug on hostile output: the answer is not in format
                    formats.append(0.0)
        metrics = {
            "reward": sum(rewards) / len(rewards),
            "pass_rate": sum(r >= 1.0 for r in rewards) / len(rewards),
            "completion_length": sum(len(answer_tokens(ids, eos_token_ids)) for ids in found) / len(found),
        }
        if formats:
            metrics["format_rate"] = sum(formats) / len(formats)
        return metrics, texts


class GenerationEvaluation(TrainerCallback):
    """Scores the prompt sets at step 0, every `eval_generation_steps` and at the end; logs and prints a table.

    Added by the self-distillation trainers when `eval_prompts` or `prior_prompts` is set. `history` maps
    each evaluated step to `{set: metrics}`; `examples` keeps the latest answers per set.
    """

    def __init__(self, trainer):
        o = trainer.options
        self.trainer = trainer
        tokenizer = trainer.processing_class
        prompt_column = getattr(o, "prompt_column", "prompt")
        self.sets = []
        if o.eval_prompts:
            self.sets.append(PromptSet("task", o.eval_prompts, o.eval_verifier, tokenizer, prompt_column, o.max_prompt_length))
        if o.prior_prompts:
            self.sets.append(PromptSet("prior", o.prior_prompts, o.prior_verifier or o.eval_verifier, tokenizer,
                                       prompt_column, o.max_prompt_length))
        self.every = o.eval_generation_steps
        self.max_new_tokens = o.eval_max_new_tokens or o.max_completion_length
        self.history: dict[int, dict[str, dict[str, float]]] = {}
        self.examples: dict[str, list[str]] = {}

    def evaluate(self, args, state, control) -> None:
        if state.global_step in self.history:
            return
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        results, logs = {}, {}
        for prompt_set in self.sets:
            metrics, texts = prompt_set.score(model, trainer.processing_class, self.max_new_tokens, trainer.eos_token_ids)
            results[prompt_set.name] = metrics
            self.examples[prompt_set.name] = texts
            logs.update({f"eval_{prompt_set.name}_{key}": value for key, value in metrics.items()})
        self.history[state.global_step] = results
        state.log_history.append({**logs, "step": state.global_step})
        trainer.callback_handler.on_log(args, state, control, logs)

    def on_train_begin(self, args, state, control, **kwargs):
        self.evaluate(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.evaluate(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.evaluate(args, state, control)
        if state.is_world_process_zero:
            print(self.table(), flush=True)

    def table(self) -> str:
        """Before (first evaluated step) / after (last) per set and metric, with the change."""
        steps = sorted(self.history)
        first, last = steps[0], steps[-1]
        paths = {s.name: s.path for s in self.sets}
        lines = [f"Held-out evaluation (greedy): step {first} -> step {last}",
                 f"{'set':<7}{'metric':<19}{'before':>8}{'after':>8}{'change':>9}"]
        for name in self.history[first]:
            for key in METRICS:
                if key not in self.history[first][name]:
                    continue
                before, after = self.history[first][name][key], self.history[last][name][key]
                lines.append(f"{name:<7}{key:<19}{before:>8.3f}{after:>8.3f}{after - before:>+9.3f}")
        lines += [f"  {name}: {path}" for name, path in paths.items()]
        return "\n".join(lines)
