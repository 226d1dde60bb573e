"""Model cards (README.md) for models trained with sd-plugin.

`write_model_card` writes a Hub model card for a merged model or a LoRA adapter: YAML front matter
(base_model, library_name, tags, datasets), the method with its paper, the base model, the data, every
hyperparameter read from the configuration that was actually used (trainer arguments or the Axolotl
config with its `sdft:` / `sdpo:` / `sdzero:` block, and the adapter's adapter_config.json), the training
metrics from trainer_state.json, the evaluation table from `sd-plugin eval-stats --json`, and code to
load the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import yaml

from sd_plugin.redact import display_name, redact_secrets

# The three methods: how the card names them and which paper it cites.
METHODS = {
    "sdft": {
        "name": "Self-Distillation Fine-Tuning (SDFT)",
        "summary": (
            "The student samples its own response to the prompt; the same model, shown the expert demonstration "
            "in context, scores that response token by token; the student is trained toward this "
            "demonstration-conditioned teacher on its own (on-policy) samples."
        ),
        "paper": "Shenfeld, Damani, Hübotter, Agrawal (2026). Self-Distillation Enables Continual Learning. arXiv:2601.19897",
        "url": "https://arxiv.org/abs/2601.19897",
        "bibtex": (
            "@misc{shenfeld2026selfdistillation,\n"
            "  title = {Self-Distillation Enables Continual Learning},\n"
            "  author = {Shenfeld, Idan and Damani, Mehul and H{\\\"u}botter, Jonas and Agrawal, Pulkit},\n"
            "  year = {2026},\n"
            "  eprint = {2601.19897},\n"
            "  archivePrefix = {arXiv},\n"
            "  url = {https://arxiv.org/abs/2601.19897}\n"
            "}"
        ),
    },
    "sdpo": {
        "name": "SDPO (reinforcement learning via self-distillation)",
        "summary": (
            "The student samples several responses per prompt and a verifier scores them (with text feedback where "
            "available); the same model, shown a successful sibling response and/or the feedback in context, is the "
            "teacher, and the student is distilled toward it on its own samples, turning feedback into dense "
            "token-level supervision."
        ),
        "paper": "Hübotter et al. (2026). Reinforcement Learning via Self-Distillation. arXiv:2601.20802",
        "url": "https://arxiv.org/abs/2601.20802",
        "bibtex": (
            "@misc{hubotter2026sdpo,\n"
            "  title = {Reinforcement Learning via Self-Distillation},\n"
            "  author = {H{\\\"u}botter, Jonas and others},\n"
            "  year = {2026},\n"
            "  eprint = {2601.20802},\n"
            "  archivePrefix = {arXiv},\n"
            "  url = {https://arxiv.org/abs/2601.20802}\n"
            "}"
        ),
    },
    "sdzero": {
        "name": "Self-Distillation Zero (SD-Zero)",
        "summary": (
            "A self-revision model (trained to revise its own verified answers after a control phrase) is frozen "
            "as the teacher; it scores the student's own response placed after the student's attempt and the "
            "control phrase, and the student is distilled toward it, turning binary rewards into dense supervision."
        ),
        "paper": (
            "He et al. (2026). Self-Distillation Zero: Self-Revision Turns Binary Rewards into Dense Supervision. "
            "arXiv:2604.12002"
        ),
        "url": "https://arxiv.org/abs/2604.12002",
        "bibtex": (
            "@misc{he2026sdzero,\n"
            "  title = {Self-Distillation Zero: Self-Revision Turns Binary Rewards into Dense Supervision},\n"
            "  author = {He and others},\n"
            "  year = {2026},\n"
            "  eprint = {2604.12002},\n"
            "  archivePrefix = {arXiv},\n"
            "  url = {https://arxiv.org/abs/2604.12002}\n"
            "}"
        ),
    },
}

# Keys shown in the "Training hyperparameters" table when present: trainer argument names first, then
# the Axolotl names for the same settings. Method options and LoRA settings get their own tables.
TRAINING_KEYS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler", "warmup_steps", "warmup_ratio", "weight_decay",
    "optim", "optimizer", "adam_beta1", "adam_beta2", "max_grad_norm",
    "num_train_epochs", "num_epochs", "max_steps",
    "per_device_train_batch_size", "micro_batch_size", "gradient_accumulation_steps",
    "sequence_len", "seed", "bf16", "fp16", "tf32", "gradient_checkpointing",
    "adapter", "load_in_4bit", "load_in_8bit", "chat_template",
)
# Axolotl spells the LoRA settings as top-level keys; adapter_config.json is preferred when present.
AXOLOTL_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear", "peft_use_rslora", "peft_use_dora")
ADAPTER_CONFIG_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "modules_to_save", "bias")
# Metrics taken from trainer_state.json log_history (first and last logged value).
METRIC_KEYS = (
    "loss", "kl", "ce_loss", "self_distillation/distillation_loss", "self_distillation/policy_loss",
    "self_distillation/reward_mean", "teacher_student_logprob_gap", "completions/mean_length",
    "completions/clipped_ratio", "on_policy_fraction", "grad_norm",
    # the names of the previous release, for runs it trained
    "distillation_loss", "completion_length", "completion_truncated_fraction",
)
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml", ".gz", ".zip")
AXOLOTL_README_CONFIG = re.compile(r"See axolotl config</summary>.*?```yaml\n(.*?)```", re.DOTALL)


# ------------------------------------------------------------------------------------ reading inputs
def as_plain_dict(config) -> dict:
    """A training configuration as a plain dict: dicts (Axolotl's DictDefault too), TrainingArguments, dataclasses."""
    if config is None:
        return {}
    if hasattr(config, "to_dict") and not isinstance(config, dict):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(dict(config), default=str))


def load_training_config(path: str | os.PathLike) -> dict:
    """Read a training configuration from a YAML (Axolotl) or JSON (trainer arguments) file."""
    text = Path(path).read_text(encoding="utf-8")
    config = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(config).__name__}")
    return config


def find_training_config(adapter_dir: str | os.PathLike) -> tuple[dict, str | None]:
    """The training configuration saved next to an adapter, and where it came from.

    Looks for `training_config.json` (e.g. `json.dump(trainer.args.to_dict(), ...)`), then for the Axolotl
    config that Axolotl embeds in the README.md it writes into its output directory.
    """
    adapter_dir = Path(adapter_dir)
    for name in ("training_config.json", "training_config.yaml", "training_config.yml"):
        if (adapter_dir / name).is_file():
            return load_training_config(adapter_dir / name), str(adapter_dir / name)
    readme = adapter_dir / "README.md"
    if readme.is_file():
        match = AXOLOTL_README_CONFIG.search(readme.read_text(encoding="utf-8"))
        if match:
            config = yaml.safe_load(match.group(1))
            if isinstance(config, dict):
                return config, f"{readme} (Axolotl config block)"
    return {}, None


def write_training_record(folder: str | os.PathLike, training_config, trainer_state=None) -> None:
    """Write `training_config.json` (secret-looking values masked) and `trainer_state.json` into `folder`: what
    `find_training_config` and `find_trainer_state` read for the card's hyperparameters and metrics.

    `training_config` is anything `as_plain_dict` takes; `trainer_state` a `transformers.TrainerState`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = redact_secrets(as_plain_dict(training_config))
    (folder / "training_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    if trainer_state is not None:
        trainer_state.save_to_json(str(folder / "trainer_state.json"))


def find_trainer_state(adapter_dir: str | os.PathLike) -> str | None:
    """trainer_state.json in the adapter directory, else in its latest checkpoint-N folder."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "trainer_state.json").is_file():
        return str(adapter_dir / "trainer_state.json")
    checkpoints = sorted(adapter_dir.glob("checkpoint-*/trainer_state.json"),
                         key=lambda path: int(path.parent.name.split("-")[-1]) if path.parent.name.split("-")[-1].isdigit() else -1)
    return str(checkpoints[-1]) if checkpoints else None


def infer_method(training_config: dict) -> str | None:
    """sdft / sdpo / sdzero from the config: an Axolotl `sdft:`-style block, else SDFT-only trainer fields."""
    for method in METHODS:
        if isinstance(training_config.get(method), dict):
            return method
    if any(key in training_config for key in ("teacher_template", "lambda_on_policy", "demonstration_column")):
        return "sdft"
    if any(key in training_config for key in ("verifier", "sdpo_mode", "success_reward_threshold", "success_threshold")):
        return "sdpo"
    return None


def method_options(training_config: dict, method: str) -> dict:
    """The self-distillation options that were used: the Axolotl block, or (for a trainer-arguments dict) the
    keys that are not plain `TrainingArguments` fields, which are the method's dataclass fields."""
    if isinstance(training_config.get(method), dict):
        return dict(training_config[method])
    if "per_device_train_batch_size" not in training_config:
        return {}  # an Axolotl config without the method block: no options to show
    from transformers import TrainingArguments

    plain_fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    return {key: value for key, value in training_config.items() if key not in plain_fields and key not in TRAINING_KEYS}


def datasets_from_config(training_config: dict) -> list[str]:
    """Dataset paths of an Axolotl config (`datasets: [{path: ...}]`)."""
    found = []
    for entry in training_config.get("datasets") or []:
        path = entry.get("path") if isinstance(entry, dict) else entry
        if path and path not in found:
            found.append(str(path))
    return found


def is_hub_id(name: str | None) -> bool:
    """True for `owner/name` strings that are neither local paths nor file names (only those belong in the front matter)."""
    return (bool(name) and HUB_ID_PATTERN.match(name) is not None and not os.path.exists(name)
            and not name.lower().endswith(FILE_SUFFIXES))


def read_log_history(metrics) -> list[dict]:
    """log_history from a trainer_state.json path, its parsed dict, a log_history list, or flat final metrics."""
    if metrics is None:
        return []
    if isinstance(metrics, (str, os.PathLike)):
        metrics = json.loads(Path(metrics).read_text(encoding="utf-8"))
    if isinstance(metrics, list):
        return metrics
    if "log_history" in metrics:
        return list(metrics["log_history"])
    return [dict(metrics)]


def find_eval_results(adapter_dir: str | os.PathLike) -> str | None:
    """`eval_results.json` (the training's held-out evaluation, sd_plugin.evaluation) in the adapter directory."""
    path = Path(adapter_dir) / "eval_results.json"
    return str(path) if path.is_file() else None


def read_eval_results(eval_results) -> dict | None:
    """The training's `eval_results.json` from a path or its parsed dict; checks it has `sets` and `after`."""
    if eval_results is None:
        return None
    if isinstance(eval_results, (str, os.PathLike)):
        eval_results = json.loads(Path(eval_results).read_text(encoding="utf-8"))
    if not isinstance(eval_results, dict) or not isinstance(eval_results.get("sets"), dict) or "after" not in eval_results:
        raise ValueError("eval results must be the eval_results.json written by the held-out evaluation ('sets' and 'after')")
    return eval_results


# Held-out metrics as the card's model-index names them (the key in eval_results.json -> a readable name).
EVAL_RESULT_NAMES = {"reward": "mean reward (greedy)", "pass_rate": "pass rate (greedy)",
                     "format_rate": "format rate (greedy)", "sampled_reward": "mean reward (sampled)",
                     "sampled_pass_rate": "pass@1 (sampled)", "sampled_format_rate": "format rate (sampled)",
                     "inference_reward": "mean reward (inference temperature)",
                     "inference_pass_rate": "pass@1 (inference temperature)",
                     "inference_format_rate": "format rate (inference temperature)"}


def model_index(eval_results: dict, name: str) -> list[dict]:
    """The Hub's `model-index` metadata: one result per prompt set, the after-training values of its metrics."""
    settings = eval_results.get("settings") or {}
    results = []
    for set_name, info in eval_results["sets"].items():
        after = (eval_results["after"].get("metrics") or {}).get(set_name) or {}
        metrics = []
        for key, label in EVAL_RESULT_NAMES.items():
            if isinstance(after.get(key), (int, float)):
                metric = {"type": key, "value": round(float(after[key]), 4), "name": label}
                if key.startswith(("sampled_", "inference_")):
                    temperature = settings.get("temperature" if key.startswith("sampled_") else "inference_temperature")
                    metric["args"] = {"temperature": temperature, "num_generations": settings.get("num_generations")}
                metrics.append(metric)
        if metrics:
            results.append({"task": {"type": "text-generation", "name": f"held-out {set_name} prompts"},
                            "dataset": {"name": info.get("path") or set_name, "type": set_name},
                            "metrics": metrics})
    return [{"name": name, "results": results}] if results else []


def eval_results_section(eval_results: dict) -> str:
    """Before / after table of the training's held-out evaluation, with sample sizes."""
    before, after = eval_results.get("before") or {}, eval_results["after"]
    rows = []
    for set_name, info in eval_results["sets"].items():
        sizes = info.get("sample_sizes") or {}
        first = (before.get("metrics") or {}).get(set_name) or {}
        last = (after.get("metrics") or {}).get(set_name) or {}
        for key, label in EVAL_RESULT_NAMES.items():
            if key not in last:
                continue
            n = sizes.get(key.split("_", 1)[0] if key.startswith(("sampled_", "inference_")) else "greedy", "-")
            rows.append([set_name, label, str(n), format_metric(first.get(key)), format_metric(last[key])])
    header = ["Set", "Metric", "n", str(before.get("label", "before")), str(after.get("label", "after"))]
    text = markdown_table(header, rows)
    decoding = (eval_results.get("settings") or {}).get("decoding")
    sets = "; ".join(f"{name}: {info.get('path')} ({info.get('prompts')} prompts, verifier {info.get('verifier')})"
                     for name, info in eval_results["sets"].items())
    return text + f"\n\nDecoding: {decoding}. n: answers scored (prompts x samples). Prompt sets: {sets}."


def read_eval_stats(eval_stats) -> dict | None:
    """The `sd-plugin eval-stats --json` output from a path or its parsed dict; checks it has `stages`."""
    if eval_stats is None:
        return None
    if isinstance(eval_stats, (str, os.PathLike)):
        eval_stats = json.loads(Path(eval_stats).read_text(encoding="utf-8"))
    if not isinstance(eval_stats, dict) or not isinstance(eval_stats.get("stages"), dict) or not eval_stats["stages"]:
        raise ValueError("eval stats must be the JSON written by `sd-plugin eval-stats --json` (a non-empty 'stages' mapping)")
    return eval_stats


# ------------------------------------------------------------------------------------ formatting
def format_setting(value) -> str:
    """One table cell for a setting: lists joined, dicts as JSON, floats in shortest exact form."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, set)):
        return ", ".join(format_setting(item) for item in (sorted(value) if isinstance(value, set) else value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)[1:-1]  # a template: its newlines shown as \n, not folded into spaces
    if isinstance(value, str):
        return display_name(value)  # a file setting shows the file's name, not the user's directories
    return str(value)


def format_metric(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def settings_table(settings: dict, keys=None) -> str:
    keys = [key for key in (keys or settings) if key in settings and settings[key] is not None]
    return markdown_table(["Setting", "Value"], [[f"`{key}`", format_setting(settings[key])] for key in keys])


def metrics_section(log_history: list[dict]) -> str:
    """Training metrics table (first and last logged value of each metric) plus the run summary."""
    summary = next((entry for entry in reversed(log_history) if "train_runtime" in entry or "train_loss" in entry), {})
    logged = [entry for entry in log_history if entry is not summary]
    keys = [key for key in METRIC_KEYS if any(key in entry for entry in logged)]
    keys += sorted({key for entry in logged for key in entry if key.startswith("eval_") and not key.startswith(GENERATION_EVAL_PREFIXES)
                    and key not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")})
    rows = []
    for key in keys:
        entries = [entry for entry in logged if key in entry]
        first, last = entries[0], entries[-1]
        rows.append([f"`{key}`", f"{format_metric(first[key])} (step {first.get('step', '-')})",
                     f"{format_metric(last[key])} (step {last.get('step', '-')})"])
    parts = []
    if rows:
        parts.append(markdown_table(["Metric", "First logged", "Last logged"], rows))
    facts = []
    if "step" in summary:
        facts.append(f"optimizer steps: {summary['step']}")
    if "train_loss" in summary:
        facts.append(f"mean training loss over the run: {format_metric(summary['train_loss'])}")
    if "train_runtime" in summary:
        facts.append(f"training time: {summary['train_runtime']:.0f} s")
    if facts:
        parts.append("; ".join(facts) + ".")
    return "\n\n".join(parts)


# The held-out evaluation during training (sd_plugin.evaluation): greedy answers scored by a verifier.
GENERATION_EVAL_PREFIXES = ("eval_task_", "eval_prior_")


def generation_evaluation(log_history: list[dict]) -> list[tuple[str, float, int, float, int]]:
    """(metric, first value, its step, last value, its step) of the held-out greedy evaluation, in logged order."""
    keys = list(dict.fromkeys(key for entry in log_history for key in entry if key.startswith(GENERATION_EVAL_PREFIXES)))
    rows = []
    for key in keys:
        entries = [entry for entry in log_history if isinstance(entry.get(key), (int, float))]
        if entries:
            rows.append((key, float(entries[0][key]), entries[0].get("step", 0), float(entries[-1][key]), entries[-1].get("step", 0)))
    return rows


def generation_eval_section(rows, config: dict) -> str:
    """The before/after table of the held-out evaluation, with the prompt sets by name."""
    table = markdown_table(["Metric", "Before (step {})".format(rows[0][2]), "After (step {})".format(rows[0][4]), "Change"],
                           [[f"`{key[len('eval_'):]}`", f"{first:.3f}", f"{last:.3f}", f"{last - first:+.3f}"]
                            for key, first, _, last, _ in rows])
    block = next((value for value in config.values() if isinstance(value, dict) and "eval_prompts" in value), config)
    sets = [f"`{name}`: {display_name(block[key])}" for name, key in (("task", "eval_prompts"), ("prior", "prior_prompts"))
            if block.get(key)]
    verifiers = [f"{display_name(block[key])}" for key in ("eval_verifier", "prior_verifier") if block.get(key)]
    text = ("Greedy answers to held-out prompts, scored by a verifier before and after training (`task`: the "
            "trained task; `prior`: a capability the base model had, to measure forgetting).")
    if sets:
        text += " Prompt sets: " + "; ".join(sets) + "."
    if verifiers:
        text += " Verifiers: " + ", ".join(dict.fromkeys(verifiers)) + "."
    return text + "\n\n" + table


def logged_model_index(name: str, rows, config: dict) -> list[dict]:
    """The card's `model-index` (Hugging Face's machine-readable results) from the held-out evaluation's logged
    metrics: for a run without eval_results.json (`model_index` reads that file where it exists)."""
    block = next((value for value in config.values() if isinstance(value, dict) and "eval_prompts" in value), config)
    results = []
    for prefix, key in (("eval_task_", "eval_prompts"), ("eval_prior_", "prior_prompts")):
        metrics = [{"type": metric[len(prefix):], "name": f"{metric[len('eval_'):]} (greedy)", "value": round(last, 4)}
                   for metric, _, _, last, _ in rows if metric.startswith(prefix)]
        if metrics:
            dataset = display_name(block.get(key) or prefix.strip("_"))
            results.append({"task": {"type": "text-generation"}, "dataset": {"name": dataset, "type": dataset},
                            "metrics": metrics})
    return [{"name": name, "results": results}] if results else []


def base_model_license(base_dir: str | os.PathLike | None) -> str | None:
    """The `license:` of a local base model's README front matter (never downloaded), else None."""
    readme = Path(base_dir) / "README.md" if base_dir else None
    if readme is None or not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None


def task_example(config: dict) -> str | None:
    """The first held-out prompt (or training prompt) of the run, as the usage example's user message."""
    block = next((value for value in config.values() if isinstance(value, dict) and "eval_prompts" in value), config)
    for path in (block.get("eval_prompts"), *[d.get("path") for d in config.get("datasets") or [] if isinstance(d, dict)]):
        if not path or not Path(str(path)).is_file():
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                row = json.loads(handle.readline())
        except (OSError, ValueError):
            continue
        prompt = row.get(block.get("prompt_column", "prompt")) if isinstance(row, dict) else None
        if isinstance(prompt, list):
            prompt = next((m.get("content") for m in reversed(prompt) if isinstance(m, dict) and m.get("role") == "user"), None)
        if isinstance(prompt, str) and prompt.strip():
            return prompt
    return None


def eval_section(eval_stats: dict) -> str:
    """One row per stage, one column per metric of `sd-plugin eval-stats`, with 95% intervals when present."""
    stages = eval_stats["stages"]
    first = next(iter(stages.values()))
    metric_keys = [key for key in first if key != "ci"]
    labels = {"n_generations": "generations", "n_good": "good", "n_bad": "bad", "mean_R": "mean R",
              "good_mean": "mean R (good)", "bad_mean": "mean R (bad)", "auc": "AUC"}
    rows = []
    for stage, result in stages.items():
        cells = [stage]
        for key in metric_keys:
            value = result.get(key)
            interval = (result.get("ci") or {}).get(key)
            shown = f"{value:.3f}" if isinstance(value, float) else format_metric(value)
            cells.append(shown + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""))
        rows.append(cells)
    header = ["Stage"] + [labels.get(key, key.replace("pass_rate:", "pass rate: ")) for key in metric_keys]
    text = markdown_table(header, rows)
    settings = eval_stats.get("settings") or {}
    if any((result.get("ci") or {}) for result in stages.values()):
        text += "\n\n[lo, hi]: 95% bootstrap interval over scenarios"
        if settings.get("bootstrap"):
            text += f" ({settings['bootstrap']} resamples, seed {settings.get('seed', 0)})"
        text += "."
    return text


def teacher_check_section(config: dict) -> str:
    """The teacher check of the start (sd_plugin.teacher_check): the template trained with and each one's scores."""
    check = config["teacher_check"]
    chosen = config.get("teacher_template_chosen")
    lead = (f"`teacher_template: auto` chose **{chosen}** on {check['templates'][0]['rows']} training rows."
            if chosen else f"The teacher template scored on {check['templates'][0]['rows']} training rows before training.")
    rows = [[f"`{t['name']}`", f"{t['exact_match']:.2f}", f"{t['similarity']:.2f}",
             "-" if t.get("verifier_pass_rate") is None else f"{t['verifier_pass_rate']:.2f}", f"{t['in_context_gain']:+.3f}"]
            for t in check["templates"]]
    table = markdown_table(["template", "teacher exact match", "similarity", "verifier pass rate", "in-context gain (nats/token)"], rows)
    return f"{lead}\n\n{table}\n\n{check['verdict']}"


def usage_code(model_ref: str, base_model: str, adapter_only: bool, prompt: str | None = None) -> str:
    """Loading and one generation; `prompt`: a prompt of the trained task (default: a generic question)."""
    message = json.dumps([{"role": "user", "content": prompt or "Explain self-distillation in two sentences."}], ensure_ascii=False)
    if adapter_only:
        return (
            "```python\n"
            "import torch\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_model}", dtype=torch.bfloat16, device_map="auto")\n'
            f'model = PeftModel.from_pretrained(base, "{model_ref}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{model_ref}")\n'
            "# model = model.merge_and_unload()  # optional: fold the adapter into the weights\n\n"
            f"messages = {message}\n"
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True).to(model.device)\n"
            "output = model.generate(**inputs, max_new_tokens=256)\n"
            'print(tokenizer.decode(output[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True))\n'
            "```"
        )
    return (
        "```python\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model_id = "{model_ref}"\n'
        "tokenizer = AutoTokenizer.from_pretrained(model_id)\n"
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.bfloat16, device_map="auto")\n\n'
        f"messages = {message}\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True).to(model.device)\n"
        "output = model.generate(**inputs, max_new_tokens=256)\n"
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True))\n'
        "```"
    )


# ------------------------------------------------------------------------------------ the card
def render_model_card(
    *,
    method: str,
    base_model: str,
    training_config=None,
    metrics=None,
    eval_stats=None,
    datasets: list[str] | None = None,
    adapter_only: bool = False,
    adapter_config: dict | str | os.PathLike | None = None,
    merge_details: list[str] | None = None,
    repo_id: str | None = None,
    title: str | None = None,
    eval_results=None,
    base_license: str | None = None,
) -> str:
    """The model card as a string (see `write_model_card` for the arguments)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    info = METHODS[method]
    config = redact_secrets(as_plain_dict(training_config))  # e.g. a judge's API key in verifier_kwargs
    if isinstance(adapter_config, (str, os.PathLike)):
        adapter_config = json.loads(Path(adapter_config).read_text(encoding="utf-8"))
    adapter_config = redact_secrets(adapter_config or {})
    datasets = [display_name(name) for name in (list(datasets or []) or datasets_from_config(config))]
    log_history = read_log_history(metrics)
    eval_stats = read_eval_stats(eval_stats)
    eval_results = read_eval_results(eval_results)
    trained_4bit = bool(config.get("load_in_4bit") or config.get("adapter") == "qlora")

    front_matter = {}
    if base_license:
        front_matter["license"] = base_license  # the base model's: the weights derive from it
    if is_hub_id(base_model):
        front_matter["base_model"] = base_model
    front_matter["library_name"] = "peft" if adapter_only else "transformers"
    front_matter["pipeline_tag"] = "text-generation"
    front_matter["tags"] = ["sd-plugin", "self-distillation", method, "qlora" if trained_4bit else "lora"]
    if not adapter_only:
        front_matter["tags"].append("merged")
    hub_datasets = [name for name in datasets if is_hub_id(name)]
    if hub_datasets:
        front_matter["datasets"] = hub_datasets

    generation_rows = generation_evaluation(log_history)
    name = title or (repo_id.split('/')[-1] if repo_id else None)
    index = logged_model_index(name or f"{display_name(base_model)}-{method}", generation_rows, config)
    if index:
        front_matter["model-index"] = index
    base_name = base_model if is_hub_id(base_model) else f"{Path(base_model).name} (local checkpoint)"
    base_model = base_model if is_hub_id(base_model) else display_name(base_model)
    artifact = "LoRA adapter" if adapter_only else "merged model (LoRA folded into the weights)"
    model_ref = repo_id or "path/to/this/model"
    heading = title or (repo_id.split('/')[-1] if repo_id else f'{base_name} {method.upper()}')
    if eval_results and model_index(eval_results, heading):
        front_matter["model-index"] = model_index(eval_results, heading)
    lines = ["---", yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {heading}", ""]
    lines += [f"A {artifact} of {base_name}, trained with {info['name']} using "
              "sd-plugin (on-policy self-distillation for Axolotl and transformers).", ""]
    lines += ["## Method", "", info["summary"], "", f"Paper: {info['paper']} ({info['url']})", ""]

    lines += ["## Model details", ""]
    lines += [f"- Base model: {base_model}", f"- Artifact: {artifact}",
              f"- License: {base_license} (the base model's)" if base_license else "- License: the base model's"]
    if trained_4bit:
        lines.append("- Training: QLoRA (LoRA on a 4-bit quantized base)")
    lines += [f"- {detail}" for detail in (merge_details or [])]
    lines.append("")

    lines += ["## Training data", ""]
    if datasets:
        lines += [f"- {name}" for name in datasets]
    else:
        lines.append("Not recorded.")
    lines.append("")

    lines += ["## Training procedure", ""]
    training_keys = [key for key in TRAINING_KEYS if key in config]
    if (config.get("max_steps") or 0) > 0:  # the step limit overrides the epoch count
        training_keys = [key for key in training_keys if key not in ("num_train_epochs", "num_epochs")]
    options = method_options(config, method) if config else {}
    if not (training_keys or options):
        lines += ["The training configuration was not provided.", ""]
    if training_keys:
        lines += ["### Training hyperparameters", "", settings_table(config, training_keys), ""]
    if options:
        section = f" (`{method}:` block)" if isinstance(config.get(method), dict) else ""
        lines += [f"### {method.upper()} options{section}", "", settings_table(options), ""]
    if isinstance(config.get("teacher_check"), dict):
        lines += ["### Teacher check", "", teacher_check_section(config), ""]
    lora = {key: adapter_config[key] for key in ADAPTER_CONFIG_KEYS if key in adapter_config}
    if not lora:
        lora = {key: config[key] for key in AXOLOTL_LORA_KEYS if key in config}
    if lora:
        lines += ["### LoRA", "", settings_table(lora), ""]

    if eval_results or generation_rows or eval_stats:
        lines += ["## Evaluation", ""]
        if eval_results:  # the table with sample sizes and sampled answers; the logged metrics otherwise
            lines += ["### Held-out evaluation", "", eval_results_section(eval_results), ""]
        elif generation_rows:
            lines += [generation_eval_section(generation_rows, config), ""]
        if eval_stats:
            lines += [eval_section(eval_stats), ""]
    if log_history:
        lines += ["## Training metrics", "", metrics_section(log_history), ""]

    lines += ["## How to use", "", usage_code(model_ref, base_model, adapter_only, task_example(config)), ""]
    lines += ["## Citation", "", f"If you use this model, cite the {method.upper()} paper:", "", "```bibtex", info["bibtex"], "```", ""]
    return "\n".join(lines)


def write_model_card(
    out_dir: str | os.PathLike,
    *,
    method: str,
    base_model: str,
    training_config=None,
    metrics=None,
    eval_stats=None,
    datasets: list[str] | None = None,
    adapter_only: bool = False,
    adapter_config: dict | str | os.PathLike | None = None,
    merge_details: list[str] | None = None,
    repo_id: str | None = None,
    title: str | None = None,
    eval_results=None,
    base_license: str | None = None,
) -> Path:
    """Write `out_dir/README.md` and return its path.

    Args:
        method: "sdft", "sdpo" or "sdzero".
        base_model: Hub id of the base model (a local path is named in the text but left out of the front matter).
        training_config: the configuration actually used: `trainer.args` (or its `to_dict()`), or the Axolotl
            config dict with its `sdft:` / `sdpo:` / `sdzero:` block.
        metrics: trainer_state.json (path or dict), `trainer.state.log_history`, or a flat dict of final metrics.
        eval_stats: `sd-plugin eval-stats --json` output (path or dict).
        datasets: dataset names; default: the Axolotl config's `datasets:` paths.
        adapter_only: card for a LoRA adapter (peft loading code) instead of a merged model.
        adapter_config: adapter_config.json (path or dict) for the LoRA table; default `out_dir/adapter_config.json`.
        merge_details: extra lines for "Model details" (how the merge was done and checked).
        repo_id: the Hub repository, used in the title and the loading code.
        eval_results: the training's eval_results.json (path or dict): the card's `model-index` metadata and a
            held-out before/after table; default `out_dir/eval_results.json` when present.
        base_license: the base model's license (front matter and details); `sd-plugin merge` reads it from a
            local base's README.md.
    """
    out_dir = Path(out_dir)
    if adapter_config is None and (out_dir / "adapter_config.json").is_file():
        adapter_config = out_dir / "adapter_config.json"
    if eval_results is None:
        eval_results = find_eval_results(out_dir)
    text = render_model_card(method=method, base_model=base_model, training_config=training_config, metrics=metrics,
                             eval_stats=eval_stats, datasets=datasets, adapter_only=adapter_only,
                             adapter_config=adapter_config, merge_details=merge_details, repo_id=repo_id, title=title,
                             eval_results=eval_results, base_license=base_license)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
