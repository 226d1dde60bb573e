"""Benchmark: SFT vs SDFT on a real model (SmolLM2-135M-Instruct), new-task score and prior-capability retention.

The question of the SDFT paper at CPU scale: learn a new task from demonstrations, and keep what the model
knew. Both methods train the same LoRA adapter (r 8 on every projection) for the same steps and batch on the
same 128 demonstrations of the contact-card task (sd_plugin.demo_task: a message about a person becomes one
line of JSON; the prompt does not describe the format):
  - sft:  plain cross-entropy on the demonstrations (`lambda_on_policy: 0`: every row is an SFT row);
  - sdft: on-policy self-distillation, the base model with the demonstration in context as teacher.
After training, greedy answers are scored on 48 held-out contact-card prompts (reward = exact card, format =
a JSON object with exactly the keys) and on 32 capital-city questions the base model mostly answers
(reward = the answer names the capital): the new skill and the retention of a prior one.

Before any training it measures, once, the base model on both sets and the base model WITH the
demonstration in context (the SDFT teacher's own greedy answers) on the task set: SDFT can only teach
what the teacher shows.

Results go to one JSONL file (one line per run, keyed by method / learning rate / seed / settings); runs
already in it are skipped, so the sweep can be stopped and resumed. `--report` prints the table and writes
the plot from the file without training.

    python -m sd_plugin.cli demo-model --out outputs/SmolLM2-135M-Instruct     # once
    nohup python benchmarks/bench_sft_vs_sdft.py > outputs/bench_sft_vs_sdft.log 2>&1 &
    python benchmarks/bench_sft_vs_sdft.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "example_configs" / "assets" / "data"
TASK_TRAIN, TASK_TEST, PRIOR_TEST = DATA / "contact_train.jsonl", DATA / "contact_test.jsonl", DATA / "capitals_test.jsonl"
TASK_VERIFIER = "sd_plugin.demo_task:ContactCardVerifier"
PRIOR_VERIFIER = "sd_plugin.demo_task:AnswerContainsVerifier"
# The teacher template that works for a 135M model (see benchmarks/README.md): the demonstration as the reply to give.
COPY_TEMPLATE = "{question}\n\nReply with exactly this text and nothing else:\n{demonstration}"
# A template that also names the format of the demonstration (this task's: one line of JSON).
JSON_TEMPLATE = "{question}\n\nAnswer with one line of JSON exactly like this:\n{demonstration}"
# The SDFT settings of the main grid (the plot); other settings are ablations.
MAIN_SDFT_SETTINGS = "/steps16/batch4/template-json/skip0/alpha0/temp1"
# The same without naming the format, to tell "shown as the reply" apart from "told it is JSON".
LIKE_THIS_TEMPLATE = "{question}\n\nAnswer exactly like this:\n{demonstration}"
TEMPLATE_NAMES = {COPY_TEMPLATE: "copy", JSON_TEMPLATE: "json", LIKE_THIS_TEMPLATE: "like-this", "paper": "paper",
                  "expert_reference": "expert_reference"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_MAX_NEW_TOKENS = 32


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def score_sets(model, tokenizer, prompts_override=None) -> dict[str, dict[str, float]]:
    from sd_plugin.evaluation import PromptSet

    task = PromptSet("task", str(TASK_TEST), TASK_VERIFIER, tokenizer, "prompt", 1024)
    prior = PromptSet("prior", str(PRIOR_TEST), PRIOR_VERIFIER, tokenizer, "prompt", 1024)
    if prompts_override is not None:
        task.prompts = prompts_override(task)
    eos = [tokenizer.eos_token_id]
    results = {"task": task.score(model, tokenizer, EVAL_MAX_NEW_TOKENS, eos)[0]}
    if prompts_override is None:
        results["prior"] = prior.score(model, tokenizer, EVAL_MAX_NEW_TOKENS, eos)[0]
    return results


def baseline(model_dir: str, template: str) -> dict:
    """The base model on both sets, and with the demonstration in context (the teacher) on the task set."""
    from sd_plugin.contexts import render_ids, sdft_teacher_messages
    from sd_plugin.testing import read_jsonl

    model, tokenizer = load(model_dir)
    demonstrations = [row["demonstration"] for row in read_jsonl(TASK_TEST)]

    def with_demonstration(task):
        return [render_ids(tokenizer, sdft_teacher_messages(record["messages"], demo, template))
                for record, demo in zip(task.records, demonstrations)]

    base = score_sets(model, tokenizer)
    in_context = score_sets(model, tokenizer, with_demonstration)["task"]
    return {"base": base, "teacher_in_context": in_context}


def teacher_in_context(model_dir: str, names: list[str], results: Path) -> None:
    """Greedy answers of the base model with the demonstration in context, per teacher template: what SDFT can teach."""
    from sd_plugin.contexts import render_ids, resolve_template, sdft_teacher_messages
    from sd_plugin.testing import read_jsonl

    model, tokenizer = load(model_dir)
    demonstrations = [row["demonstration"] for row in read_jsonl(TASK_TEST)]
    by_name = {name: text for text, name in TEMPLATE_NAMES.items()}
    for name in names:
        key = f"teacher-in-context/{name}"
        if key in {row.get("key") for row in read_results(results)}:
            continue
        template = resolve_template(by_name.get(name, name))

        def with_demonstration(task, template=template):
            return [render_ids(tokenizer, sdft_teacher_messages(record["messages"], demo, template))
                    for record, demo in zip(task.records, demonstrations)]

        row = {"key": key, "template": template, "task": score_sets(model, tokenizer, with_demonstration)["task"]}
        append(results, row)
        print(json.dumps(row), flush=True)


def train_one(model_dir: str, run: dict, output_root: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig

    from sd_plugin import SDFTConfig, SDFTTrainer

    torch.manual_seed(run["seed"])
    model, tokenizer = load(model_dir)
    records = load_dataset("json", data_files=str(TASK_TRAIN), split="train").remove_columns(["answer"])
    sft = run["method"] == "sft"
    args = SDFTConfig(
        output_dir=str(output_root / run_key(run).replace("/", "_")), max_steps=run["steps"], per_device_train_batch_size=run["batch"],
        learning_rate=run["lr"], lr_scheduler_type="constant_with_warmup", warmup_steps=2, seed=run["seed"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        max_completion_length=run["max_completion_length"], max_prompt_length=256, max_teacher_prompt_length=512,
        teacher_model_kind=run.get("teacher") or "base", teacher_template=run["template"], distillation_alpha=run["alpha"],
        num_loss_tokens_to_skip=run["skip"], temperature=run["temperature"],
        lambda_on_policy=0.0 if sft else run.get("lambda_on_policy", 1.0),
        **({"eval_prompts": str(TASK_TEST), "eval_verifier": TASK_VERIFIER, "prior_prompts": str(PRIOR_TEST),
            "prior_verifier": PRIOR_VERIFIER, "eval_generation_steps": run["eval_every"],
            "eval_max_new_tokens": EVAL_MAX_NEW_TOKENS} if run.get("eval_every") else {}),
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = SDFTTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer, peft_config=peft_config)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # The learning curve when --eval-every is set: held-out scores at step 0, every N steps and at the end.
    curve = [{"step": e["step"], "task": e["eval_task_reward"], "format": e["eval_task_format_rate"],
              "prior": e.get("eval_prior_reward")} for e in trainer.state.log_history if "eval_task_reward" in e]
    return {**run, "key": run_key(run), "train_seconds": round(seconds, 1), "first_loss": losses[0], "last_loss": losses[-1],
            **({"curve": curve} if curve else {}), **score_sets(trainer.model, tokenizer)}


def run_key(run: dict) -> str:
    parts = [run["method"], f"lr{run['lr']:g}", f"seed{run['seed']}", f"steps{run['steps']}", f"batch{run['batch']}"]
    if run["method"] == "sdft":
        template = TEMPLATE_NAMES.get(run["template"], run["template"])
        parts += [f"template-{template}", f"skip{run['skip']}", f"alpha{run['alpha']:g}", f"temp{run['temperature']:g}"]
        # Settings added after the first sweep: in the key only when not the default, so earlier rows keep their keys.
        if run.get("teacher", "base") != "base":
            parts.append(f"teacher-{run['teacher']}")
        if run.get("lambda_on_policy", 1.0) != 1.0:
            parts.append(f"lambda{run['lambda_on_policy']:g}")
    return "/".join(parts)


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def report(path: Path, plot: Path | None) -> str:
    rows = read_results(path)
    base = next((r for r in rows if r.get("key") == "baseline"), None)
    teachers = [r for r in rows if r.get("key", "").startswith("teacher-in-context/")]
    runs = [r for r in rows if r.get("key") != "baseline" and r not in teachers]
    lines = []
    if base:
        b, t = base["base"], base["teacher_in_context"]
        lines.append(f"base model: task exact {b['task']['reward']:.3f}, task format {b['task']['format_rate']:.3f}, "
                     f"prior {b['prior']['reward']:.3f}; with the demonstration in context ({TEMPLATE_NAMES.get(base['template'], 'custom')} "
                     f"template): task exact "
                     f"{t['reward']:.3f}, format {t['format_rate']:.3f}")
        lines.append("")
    if teachers:
        lines.append("| teacher template (base model, demonstration in context) | task exact | task format |")
        lines.append("|---|---|---|")
        for r in teachers:
            lines.append(f"| {r['key'].split('/', 1)[1]} | {r['task']['reward']:.3f} | {r['task']['format_rate']:.3f} |")
        lines.append("")
    lines.append("| run | task exact | task format | prior (capitals) | first -> last loss | train s |")
    lines.append("|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: r["key"]):
        lines.append(f"| {r['key']} | {r['task']['reward']:.3f} | {r['task']['format_rate']:.3f} | {r['prior']['reward']:.3f} "
                     f"| {r['first_loss']:.3g} -> {r['last_loss']:.3g} | {r['train_seconds']:.0f} |")
    for r in sorted(runs, key=lambda r: r["key"]):
        if r.get("curve"):
            points = ", ".join(f"{c['step']}: {c['task']:.2f}/{c['format']:.2f}/{c['prior']:.2f}" for c in r["curve"])
            lines.append(f"\nlearning curve of {r['key']} (step: task exact/format/prior): {points}")
    # Mean over seeds per method and learning rate (the settings of the sweep's default grid).
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["key"].replace(f"/seed{r['seed']}", ""), []).append(r)
    lines.append("")
    lines.append("| method / lr / settings (mean over seeds) | seeds | task exact | task format | prior (capitals) |")
    lines.append("|---|---|---|---|---|")
    means = []
    for label, group in sorted(groups.items()):
        mean = {"task": sum(g["task"]["reward"] for g in group) / len(group),
                "format": sum(g["task"]["format_rate"] for g in group) / len(group),
                "prior": sum(g["prior"]["reward"] for g in group) / len(group)}
        means.append((group[0]["method"], group[0]["lr"], mean, label))
        lines.append(f"| {label} | {len(group)} | {mean['task']:.3f} | {mean['format']:.3f} | {mean['prior']:.3f} |")
    if plot is not None and means:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4.5))
        for method, marker in (("sft", "o"), ("sdft", "s")):
            # The main grid only (SFT, and SDFT with the default settings); ablations are in the table.
            points = [(m["task"], m["prior"], lr) for meth, lr, m, label in means
                      if meth == method and (method == "sft" or label.endswith(MAIN_SDFT_SETTINGS))]
            if points:
                axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, s=60, label=method.upper())
                for x, y, lr in points:
                    axis.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if base:
            axis.scatter([base["base"]["task"]["reward"]], [base["base"]["prior"]["reward"]], marker="*", s=150,
                         color="black", label="base model")
        axis.set_xlabel("new task: exact contact cards (held-out, greedy)")
        axis.set_ylabel("prior capability: capitals answered")
        axis.set_title("SmolLM2-135M-Instruct, LoRA: SFT vs SDFT (labels: learning rate)")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(plot, dpi=110)
        lines.append(f"\nplot: {plot}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "outputs" / "SmolLM2-135M-Instruct"), help="sd-plugin demo-model output")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "sft_vs_sdft.jsonl"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "sft_vs_sdft.png"))
    parser.add_argument("--methods", default="sft,sdft")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--template", default="json", help="SDFT teacher template (paper, expert_reference, copy, json, or a string)")
    parser.add_argument("--skip", type=int, default=0, help="SDFT num_loss_tokens_to_skip")
    parser.add_argument("--alpha", type=float, default=0.0, help="SDFT distillation_alpha (0 forward KL, 1 reverse KL)")
    parser.add_argument("--temperature", type=float, default=1.0, help="SDFT rollout temperature")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--teacher", default="base", help="SDFT teacher kind (base, ema, live, initial)")
    parser.add_argument("--lambda-on-policy", type=float, default=1.0, help="SDFT fraction of on-policy rows (the rest SFT rows)")
    parser.add_argument("--eval-every", type=int, default=0, help="also record the held-out learning curve every N steps")
    parser.add_argument("--teacher-templates", default=None,
                        help="only score the teacher in context with these templates (comma-separated names)")
    parser.add_argument("--report", action="store_true", help="print the table / write the plot from --results only")
    args = parser.parse_args(argv)
    results = Path(args.results)
    args.template = {name: text for text, name in TEMPLATE_NAMES.items()}.get(args.template, args.template)
    if args.teacher_templates and not args.report:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        teacher_in_context(args.model, args.teacher_templates.split(","), results)
    elif not args.report:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        if "baseline" not in {row.get("key") for row in read_results(results)}:
            row = {"key": "baseline", "template": args.template, **baseline(args.model, args.template)}
            append(results, row)
            print(json.dumps(row), flush=True)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for lr in [float(x) for x in args.lrs.split(",")]:
                for method in args.methods.split(","):
                    run = {"method": method, "lr": lr, "seed": seed, "steps": args.steps, "batch": args.batch,
                           "template": args.template, "skip": args.skip, "alpha": args.alpha, "temperature": args.temperature,
                           "max_completion_length": args.max_completion_length, "teacher": args.teacher,
                           "lambda_on_policy": args.lambda_on_policy, "eval_every": args.eval_every}
                    if run_key(run) in {row.get("key") for row in read_results(results)}:  # another worker may have run it
                        continue
                    row = train_one(args.model, run, REPO / "outputs" / "bench_sft_vs_sdft")
                    append(results, row)
                    print(json.dumps(row), flush=True)
    print(report(results, Path(args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
