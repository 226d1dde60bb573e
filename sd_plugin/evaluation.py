"""Evaluation during training: greedy answers to held-out prompts, scored by a verifier, before, during, after.

Two prompt sets, each a JSONL of prompt records (the prompt column, optional `system` / `tools`, and the
fields the verifier reads, e.g. `answer`):
- `eval_prompts` + `eval_verifier`: the task being trained (held out from the training data);
- `prior_prompts` + `prior_verifier`: questions the base model already answers, so that forgetting is a number.

Each set is answered greedily (the model's own chat template, `eval_max_new_tokens` tokens at most) at step
0, every `eval_generation_steps` steps and at the end, and, with `eval_num_generations` n > 0, sampled n times
per prompt at the rollout temperature (`eval_{set}_sampled_*`) and, with `eval_temperature`, at that inference
temperature (`eval_{set}_inference_*`): pass@1 estimated from n samples, what a user who samples will see. Logged as `eval_{set}_reward` (mean reward),
`eval_{set}_pass_rate` (reward >= 1), `eval_{set}_format_rate` (when the verifier has a
`format_score(prompt, completion, record)` method) and `eval_{set}_completion_length` (tokens), through the
trainer's reporters (W&B, TensorBoard, the console), printed at the end as a before/after table with the
sample sizes, and written to `eval_results.json` in the output folder (the model card's `model-index` reads it).
`sd-plugin evaluate CONFIG.yml [--adapter DIR]` scores a saved model the same way (`main`).
Answers are model output: the verifier is called through `safe_verify`, so a verifier that raises scores 0.

Decoding is the rollouts': one explicit GenerationConfig (`sd_plugin.rollout.generation_config`), so nothing of
the checkpoint's generation_config.json (repetition_penalty, no_repeat_ngram_size, ...) changes "greedy". The
verifier reads the text training's verifiers read (`sd_plugin.data.completion_text`: end-of-turn ids dropped,
every other token kept, special ones such as <tool_call> included), so a task scores the same text in both.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from sd_plugin.data import Columns, RecordError, completion_text, prompt_record
from sd_plugin.files import read_jsonl_rows
from sd_plugin.redact import display_name
from sd_plugin.rollout import SamplingOptions, generate_rollouts
from sd_plugin.rows import left_pad, tokenize_prompt
from sd_plugin.verifiers import load_verifier, safe_verify

LOG = logging.getLogger("sd_plugin")
METRICS = ("reward", "pass_rate", "format_rate", "completion_length")
SAMPLED_METRICS = ("reward", "pass_rate", "format_rate")  # per sampled decoding (the length is the greedy one's)
TABLE_METRICS = METRICS + tuple(f"{prefix}_{key}" for prefix in ("sampled", "inference") for key in SAMPLED_METRICS)
EVAL_RESULTS_FILE = "eval_results.json"


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
        self.name, self.path, self.verifier_spec = name, path, verifier_spec
        self.records = read_prompt_set(path, prompt_column)
        self.verifier = load_verifier(verifier_spec)
        self.prompts = []
        for line_number, record in enumerate(self.records, 1):
            try:
                self.prompts.append(tokenize_prompt(tokenizer, record, max_prompt_length, line_number))
            except RecordError as error:
                raise ValueError(f"{path}:{line_number}: {error.reason}") from None

    def score(self, model, tokenizer, max_new_tokens: int, eos_token_ids: list[int],
              sampling: SamplingOptions | None = None) -> tuple[dict[str, float], list[str]]:
        """Mean metrics (see the module doc) of greedy answers, or with `sampling` of `num_generations` sampled
        answers per prompt (reward and pass rate over all of them: pass@1 estimated from n samples), and the
        answers' text (prompt-major)."""
        if sampling is None:
            found = greedy_answers(model, tokenizer, self.prompts, max_new_tokens, eos_token_ids)
        else:
            found = answers(model, self.prompts, sampling, eos_token_ids, tokenizer.pad_token_id)
        per_prompt = len(found) // len(self.records)
        # The verifiers' one decoding rule (training's too): only end-of-turn ids are dropped, so a tool-call
        # task scores the same text here as in SDPO / SD-Zero training (special tokens such as <tool_call> stay).
        texts = [completion_text(tokenizer, ids, eos_token_ids) for ids in found]
        rewards, formats = [], []
        for index, text in enumerate(texts):
            row = index // per_prompt
            record = self.records[row]
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


@dataclass
class EvaluationSettings:
    """How the prompt sets are answered: greedy, plus `num_generations` samples per prompt at each temperature."""

    max_new_tokens: int
    num_generations: int = 0                  # 0: greedy only
    temperature: float = 1.0                  # the rollouts' ("sampled")
    inference_temperature: float | None = None  # the user's ("inference"); None: not scored
    top_p: float = 1.0
    top_k: int | None = None
    seed: int = 0

    @classmethod
    def from_options(cls, o, seed: int = 0) -> "EvaluationSettings":
        return cls(max_new_tokens=o.eval_max_new_tokens or o.max_completion_length, num_generations=o.eval_num_generations,
                   temperature=o.temperature, inference_temperature=o.eval_temperature, top_p=o.top_p, top_k=o.top_k,
                   seed=seed)

    def modes(self) -> list[tuple[str, SamplingOptions | None]]:
        """(metric prefix, sampling) per decoding: "" greedy, "sampled_" and "inference_" n samples each."""
        found = [("", None)]
        if self.num_generations:
            temperatures = [("sampled_", self.temperature)]
            if self.inference_temperature is not None:
                temperatures.append(("inference_", self.inference_temperature))
            for prefix, temperature in temperatures:
                found.append((prefix, SamplingOptions(self.max_new_tokens, temperature, self.top_p, self.top_k,
                                                      self.num_generations)))
        return found

    def describe(self) -> str:
        text = "greedy"
        if self.num_generations:
            text += f"; sampled: {self.num_generations} per prompt at temperature {self.temperature:g}"
            if self.inference_temperature is not None:
                text += f"; inference: {self.num_generations} per prompt at temperature {self.inference_temperature:g}"
            if self.top_p < 1.0 or self.top_k:
                text += f" (top_p {self.top_p:g}, top_k {self.top_k or 'off'})"
        return text


def evaluate_sets(model, tokenizer, sets: list[PromptSet], settings: EvaluationSettings, eos_token_ids: list[int],
                  step: int = 0) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """`{set: metrics}` of every decoding (greedy keys bare, sampled ones prefixed) and the greedy answers' text.

    Sampling draws from its own seeded generator state (`settings.seed` + step), restored afterwards: the
    evaluation changes neither the training's random stream (a resumed run samples what the uninterrupted one
    did) nor its own numbers from run to run.
    """
    results, examples = {}, {}
    for prompt_set in sets:
        metrics = {}
        for prefix, sampling in settings.modes():
            if sampling is None:
                scored, texts = prompt_set.score(model, tokenizer, settings.max_new_tokens, eos_token_ids)
                examples[prompt_set.name] = texts
            else:
                devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(settings.seed + step)
                    scored, _ = prompt_set.score(model, tokenizer, settings.max_new_tokens, eos_token_ids, sampling)
                scored = {key: value for key, value in scored.items() if key in SAMPLED_METRICS}
            metrics.update({f"{prefix}{key}": value for key, value in scored.items()})
        results[prompt_set.name] = metrics
    return results, examples


def sample_sizes(prompt_set: PromptSet, settings: EvaluationSettings) -> dict[str, int]:
    """Answers scored per decoding: {"greedy": prompts, "sampled": prompts x n, "inference": ...}."""
    sizes = {"greedy": len(prompt_set.records)}
    for prefix, sampling in settings.modes()[1:]:
        sizes[prefix.rstrip("_")] = len(prompt_set.records) * sampling.num_generations
    return sizes


def evaluation_table(history: dict[int, dict[str, dict[str, float]]], sets: list[PromptSet],
                     settings: EvaluationSettings, labels: tuple[str, str] | None = None) -> str:
    """Before (first evaluated step) / after (last) per set and metric, with the change and the sample size n
    (answers scored: prompts x samples). One column when only one model was scored."""
    steps = sorted(history)
    first, last = steps[0], steps[-1]
    before_label, after_label = labels or (f"step {first}", f"step {last}")
    single = len(steps) == 1 and labels is None
    title = f"step {first}" if single else f"{before_label} -> {after_label}"
    lines = [f"Held-out evaluation: {title} ({settings.describe()})"]
    lines.append(f"{'set':<7}{'metric':<27}{'n':>6}{'score':>8}" if single else
                 f"{'set':<7}{'metric':<27}{'n':>6}{'before':>8}{'after':>8}{'change':>9}")
    for prompt_set in sets:
        name = prompt_set.name
        sizes = sample_sizes(prompt_set, settings)
        for key in TABLE_METRICS:
            if key not in history[first].get(name, {}) or key not in history[last].get(name, {}):
                continue
            n = sizes[key.split("_", 1)[0] if key.startswith(("sampled_", "inference_")) else "greedy"]
            before, after = history[first][name][key], history[last][name][key]
            if single:
                lines.append(f"{name:<7}{key:<27}{n:>6}{after:>8.3f}")
            else:
                lines.append(f"{name:<7}{key:<27}{n:>6}{before:>8.3f}{after:>8.3f}{after - before:>+9.3f}")
    lines += [f"  {s.name}: {s.path}" for s in sets]
    return "\n".join(lines)


def no_gain_warnings(history: dict[int, dict[str, dict[str, float]]], set_name: str = "task") -> list[str]:
    """What did not rise on the task set between the first and the last evaluation: the greedy reward, and the
    sampled one (a model can learn to answer greedily and still not when sampled). Empty when both rose or when
    there is no task set or only one evaluation."""
    steps = sorted(history)
    if len(steps) < 2 or set_name not in history[steps[0]] or set_name not in history[steps[-1]]:
        return []
    before, after = history[steps[0]][set_name], history[steps[-1]][set_name]
    found = []
    for key, what in (("reward", "greedy answers"), ("sampled_reward", "sampled answers")):
        if key in before and key in after and not after[key] > before[key]:
            found.append(f"held-out {set_name} {key} did not rise ({before[key]:.3f} at step {steps[0]} -> {after[key]:.3f} "
                         f"at step {steps[-1]}): on {what} this run did not learn the task")
    return found


def evaluation_record(history: dict[int, dict[str, dict[str, float]]], sets: list[PromptSet],
                      settings: EvaluationSettings, labels: tuple[str, str] | None = None) -> dict:
    """What `eval_results.json` holds (and the model card's `model-index` reads): settings, sets with their
    sample sizes, before / after metrics and every evaluated step."""
    steps = sorted(history)
    return {
        "settings": dict(vars(settings), decoding=settings.describe()),
        "sets": {s.name: {"path": display_name(s.path), "verifier": s.verifier_spec, "prompts": len(s.records),
                          "sample_sizes": sample_sizes(s, settings)} for s in sets},
        "before": {"label": (labels or (f"step {steps[0]}",))[0], "step": steps[0], "metrics": history[steps[0]]},
        "after": {"label": (labels[1] if labels else f"step {steps[-1]}"), "step": steps[-1], "metrics": history[steps[-1]]},
        "history": {str(step): history[step] for step in steps},
    }


def write_evaluation_record(folder: str, record: dict) -> str:
    """`folder/eval_results.json` (written whole, then renamed: never half a file)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, EVAL_RESULTS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    os.replace(path + ".tmp", path)
    return path


def load_prompt_sets(o, tokenizer) -> list[PromptSet]:
    """The configured prompt sets of a method's options (`eval_prompts`, `prior_prompts`)."""
    prompt_column = getattr(o, "prompt_column", "prompt")
    sets = []
    if o.eval_prompts:
        sets.append(PromptSet("task", o.eval_prompts, o.eval_verifier, tokenizer, prompt_column, o.max_prompt_length))
    if o.prior_prompts:
        sets.append(PromptSet("prior", o.prior_prompts, o.prior_verifier or o.eval_verifier, tokenizer,
                              prompt_column, o.max_prompt_length))
    return sets


class GenerationEvaluation(TrainerCallback):
    """Scores the prompt sets at step 0, every `eval_generation_steps` and at the end; logs, prints a table and
    writes `eval_results.json` into the output folder.

    Added by the self-distillation trainers when `eval_prompts` or `prior_prompts` is set. `history` maps
    each evaluated step to `{set: metrics}`; `examples` keeps the latest greedy answers per set.
    """

    def __init__(self, trainer):
        o = trainer.options
        self.trainer = trainer
        self.sets = load_prompt_sets(o, trainer.processing_class)
        self.every = o.eval_generation_steps
        self.settings = EvaluationSettings.from_options(o, seed=trainer.args.seed)
        self.max_new_tokens = self.settings.max_new_tokens
        self.history: dict[int, dict[str, dict[str, float]]] = {}
        self.examples: dict[str, list[str]] = {}

    def evaluate(self, args, state, control) -> None:
        if state.global_step in self.history:
            return
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        results, examples = evaluate_sets(model, trainer.processing_class, self.sets, self.settings,
                                          trainer.eos_token_ids, step=state.global_step)
        self.examples.update(examples)
        logs = {f"eval_{name}_{key}": value for name, metrics in results.items() for key, value in metrics.items()}
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
            for message in no_gain_warnings(self.history):
                LOG.warning("%s. Check the teacher (sd-plugin check-teacher, teacher_template: auto), train longer or at a "
                            "lower learning rate; for sampled answers, sample at a lower temperature.", message)
            if args.should_save:
                write_evaluation_record(args.output_dir, self.record())

    def table(self) -> str:
        return evaluation_table(self.history, self.sets, self.settings)

    def record(self) -> dict:
        return evaluation_record(self.history, self.sets, self.settings)


# ------------------------------------------------------------------ `sd-plugin evaluate`
def evaluate_saved_model(config_path: str, adapter: str | None = None, model_path: str | None = None,
                         dtype: str = "auto") -> tuple[dict[int, dict], list[PromptSet], EvaluationSettings, tuple[str, str] | None]:
    """Score the prompt sets of a training config (its `sdft:` / `sdpo:` / `sdzero:` block) on a saved model.

    The model is `model_path` (a merged model) or the config's `base_model`; with `adapter`, the base is scored
    first ("base") and then with the adapter folded in ("adapter"), as the training's before / after. Returns
    what `evaluation_table` and `evaluation_record` take.
    """
    from transformers import AutoTokenizer

    from sd_plugin.axolotl.args import METHODS, _validated_block, options_class
    from sd_plugin.cli import UsageError
    from sd_plugin.data import end_of_turn_ids
    from sd_plugin.generate import load_model
    from sd_plugin.model_card import load_training_config

    if not os.path.isfile(config_path):
        raise UsageError(f"{config_path}: no such file")
    try:
        config = load_training_config(config_path)
    except (ValueError, json.JSONDecodeError) as error:
        raise UsageError(f"{config_path}: {error}") from None
    method = config.get("trainer_type")
    if method not in METHODS:
        raise UsageError(f"{config_path}: trainer_type must be one of {', '.join(METHODS)}, got {method!r}")
    try:
        options = options_class(method)(**_validated_block(method, config.get(method)).model_dump())
    except ValueError as error:
        raise UsageError(f"{config_path}: {error}") from None
    if not (options.eval_prompts or options.prior_prompts):
        raise UsageError(f"{config_path}: the {method}: block sets neither eval_prompts nor prior_prompts: nothing to score")
    model_path = model_path or config.get("base_model")
    if not model_path:
        raise UsageError(f"{config_path}: no base_model, and no --model given")
    if adapter is not None and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UsageError(f"--adapter {adapter}: no adapter_config.json in it")
    tokenizer_dir = adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    sets = load_prompt_sets(options, tokenizer)
    settings = EvaluationSettings.from_options(options, seed=config.get("seed") if config.get("seed") is not None else 42)
    model = load_model(model_path, None, dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    eos = end_of_turn_ids(tokenizer, model)
    results, _ = evaluate_sets(model, tokenizer, sets, settings, eos)
    if adapter is None:
        return {0: results}, sets, settings, None
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    after, _ = evaluate_sets(model, tokenizer, sets, settings, eos)
    return {0: results, 1: after}, sets, settings, ("base", "adapter")


def main(argv: list[str] | None = None) -> int:
    """`sd-plugin evaluate CONFIG.yml [--adapter DIR] [--model DIR] [--json FILE]`."""
    from sd_plugin.cli import argument_parser

    parser = argument_parser("evaluate", "Score a saved model on the held-out prompt sets of a training config "
                                         "(eval_prompts, prior_prompts) and print the training's before/after table.")
    parser.add_argument("config", help="the training config (YAML with trainer_type and its block)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder: scores the base, then base + adapter")
    parser.add_argument("--model", default=None, help="model folder or Hub id instead of the config's base_model "
                                                      "(e.g. a merged model)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results (eval_results.json's form) here")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    args = parser.parse_args(argv)
    history, sets, settings, labels = evaluate_saved_model(args.config, args.adapter, args.model, args.dtype)
    print(evaluation_table(history, sets, settings, labels), flush=True)
    if args.json_path:
        record = evaluation_record(history, sets, settings, labels)
        record["model"] = {"model": display_name(args.model or ""), "adapter": display_name(args.adapter or "")}
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
    return 0
