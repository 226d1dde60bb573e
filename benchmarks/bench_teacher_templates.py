"""Benchmark: teacher templates on two demo tasks of different kinds: the teacher check, then SDFT with each.

SDFT can only teach what its teacher shows. For each task (sd_plugin.demo_task) and teacher template this
measures the teacher first (`sd_plugin.teacher_check.check_teacher` on training rows: the base model's greedy
answer with the demonstration in context vs the demonstration, the task verifier's pass rate on it, and the
in-context gain of the demonstration's log-prob), then trains SDFT with `paper`, the hand-picked template and
`teacher_template: auto` (the trainer's own choice) at the same steps, learning rate and seeds, and scores
greedy answers on the held-out prompts of the task and on the capital questions (prior capability).

Tasks:
  - contact: a message about a person -> one line of JSON (`ContactCardVerifier`; hand-picked template `json`);
  - city: "Where does Maria live?" + a message -> "CITY: LISBON" (`CityTagVerifier`; hand-picked template `capitals`).

Results go to one JSONL file (a line per measurement, keyed); lines already there are skipped, so runs can be
stopped and resumed. `--report` prints the tables and writes the plot from the file.

    python -m sd_plugin.cli demo-model --out outputs/SmolLM2-135M-Instruct     # once
    python benchmarks/bench_teacher_templates.py --scores-only                 # the teacher check, every template
    nohup python benchmarks/bench_teacher_templates.py > outputs/bench_teacher_templates.log 2>&1 &
    python benchmarks/bench_teacher_templates.py --report
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
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = REPO / "example_configs" / "assets" / "data"
PRIOR_TEST, PRIOR_VERIFIER = DATA / "capitals_test.jsonl", "sd_plugin.demo_task:AnswerContainsVerifier"
TASKS = {
    "contact": {"train": DATA / "contact_train.jsonl", "test": DATA / "contact_test.jsonl",
                "verifier": "sd_plugin.demo_task:ContactCardVerifier", "handpicked": "json"},
    "city": {"train": DATA / "city_train.jsonl", "test": DATA / "city_test.jsonl",
             "verifier": "sd_plugin.demo_task:CityTagVerifier", "handpicked": "capitals"},
}
# Templates written for one task (they name its format): the "hand-picked" ones.
TASK_TEMPLATES = {
    "json": "{question}\n\nAnswer with one line of JSON exactly like this:\n{demonstration}",
    "capitals": "{question}\n\nAnswer in capital letters exactly like this:\n{demonstration}",
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_NEW_TOKENS = 32


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def template_text(name: str) -> str:
    return TASK_TEMPLATES.get(name, name)


def teacher_scores(model_dir: str, task: str, rows: int) -> dict:
    """The teacher check of every built-in template and both hand-picked ones on `rows` training rows."""
    from sd_plugin.contexts import AUTO_CANDIDATES, TEMPLATES
    from sd_plugin.teacher_check import check_teacher, sample_rows
    from sd_plugin.testing import read_jsonl
    from sd_plugin.verifiers import load_verifier

    model, tokenizer = load(model_dir)
    spec = TASKS[task]
    sample = sample_rows(read_jsonl(spec["train"]), rows, seed=0)
    result = check_teacher(model, tokenizer, sample, {**TEMPLATES, **TASK_TEMPLATES}, verifier=load_verifier(spec["verifier"]),
                           verifier_name=spec["verifier"])
    auto = max((s for s in result.scores if s.name in AUTO_CANDIDATES), key=lambda s: s.rank_key())
    return {"key": f"scores/{task}/rows{rows}", "task": task, "rows": rows, "auto_choice": auto.name,
            "seconds": round(result.seconds, 1), "templates": result.to_dict()["templates"]}


def score_sets(model, tokenizer, task: str) -> dict:
    from sd_plugin.evaluation import PromptSet

    eos = [tokenizer.eos_token_id]
    out = {}
    for name, path, verifier in (("task", TASKS[task]["test"], TASKS[task]["verifier"]), ("prior", PRIOR_TEST, PRIOR_VERIFIER)):
        out[name] = PromptSet(name, str(path), verifier, tokenizer, "prompt", 1024).score(model, tokenizer, MAX_NEW_TOKENS, eos)[0]
    return out


def train_one(model_dir: str, run: dict, output_root: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig

    from sd_plugin import SDFTConfig, SDFTTrainer

    torch.manual_seed(run["seed"])
    model, tokenizer = load(model_dir)
    spec = TASKS[run["task"]]
    records = load_dataset("json", data_files=str(spec["train"]), split="train")
    args = SDFTConfig(
        output_dir=str(output_root / run["key"].replace("/", "_")), max_steps=run["steps"], per_device_train_batch_size=4,
        learning_rate=run["lr"], lr_scheduler_type="constant_with_warmup", warmup_steps=2, seed=run["seed"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        max_completion_length=MAX_NEW_TOKENS, max_prompt_length=256, max_teacher_prompt_length=512,
        teacher_template=template_text(run["template"]), num_loss_tokens_to_skip=run["skip"],
        eval_verifier=spec["verifier"],  # read by the teacher check (auto ranks templates by its pass rate)
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = SDFTTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer, peft_config=peft_config)
    start = time.time()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {**run, "train_seconds": round(time.time() - start, 1), "first_loss": losses[0], "last_loss": losses[-1],
            "template_trained": trainer.teacher_template_chosen or run["template"],
            "teacher_check": trainer.teacher_check.metrics(trainer.teacher_template_chosen) if trainer.teacher_check else None,
            **score_sets(trainer.model, tokenizer, run["task"])}


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
    lines = []
    for row in (r for r in rows if r["key"].startswith("scores/")):
        lines.append(f"teacher check, task {row['task']}, {row['rows']} training rows (auto picks {row['auto_choice']} "
                     "among the built-in candidates):")
        lines.append("| template | teacher exact | similarity | verifier pass | in-context gain |")
        lines.append("|---|---|---|---|---|")
        for t in row["templates"]:
            passed = "-" if t["verifier_pass_rate"] is None else f"{t['verifier_pass_rate']:.2f}"
            lines.append(f"| {t['name']} | {t['exact_match']:.2f} | {t['similarity']:.2f} | {passed} | {t['in_context_gain']:+.3f} |")
        lines.append("")
    # A row's "task" holds the task's held-out scores (score_sets); the task's name is the key's second part.
    base = {r["key"].split("/")[1]: r for r in rows if r["key"].startswith("base/")}
    runs = [dict(r, task_name=r["key"].split("/")[1]) for r in rows if r["key"].startswith("sdft/")]
    lines.append("| task | template | seeds | trained with | task pass | task format | prior (capitals) |")
    lines.append("|---|---|---|---|---|---|---|")
    means = []
    for task in TASKS:
        if task in base:
            b = base[task]
            lines.append(f"| {task} | (base model) | - | - | {b['task']['pass_rate']:.3f} | {b['task'].get('format_rate', 0):.3f} "
                         f"| {b['prior']['pass_rate']:.3f} |")
        for template in ("paper", TASKS[task]["handpicked"], "auto"):
            group = [r for r in runs if r["task_name"] == task and r["template"] == template]
            if not group:
                continue
            mean = {k: sum(r[s][m] for r in group) / len(group)
                    for k, s, m in (("task", "task", "pass_rate"), ("format", "task", "format_rate"), ("prior", "prior", "pass_rate"))}
            trained = ", ".join(sorted({r["template_trained"] for r in group}))
            seeds = ", ".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]))
            lines.append(f"| {task} | {template} | {seeds} | {trained} | {mean['task']:.3f} | {mean['format']:.3f} | {mean['prior']:.3f} |")
            means.append((task, template, mean))
    lines.append("")
    for r in sorted(runs, key=lambda r: r["key"]):
        lines.append(f"{r['key']}: trained with {r['template_trained']}, task pass {r['task']['pass_rate']:.3f}, "
                     f"format {r['task']['format_rate']:.3f}, prior {r['prior']['pass_rate']:.3f}, loss "
                     f"{r['first_loss']:.3g} -> {r['last_loss']:.3g}, {r['train_seconds']:.0f} s")
    if plot is not None and means:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(TASKS), figsize=(9, 3.8), sharey=True)
        for axis, task in zip(axes, TASKS):
            points = [(template, m) for t, template, m in means if t == task]
            labels = [p[0] for p in points]
            x = range(len(points))
            axis.bar([i - 0.2 for i in x], [p[1]["task"] for p in points], width=0.4, label="held-out task (pass)")
            axis.bar([i + 0.2 for i in x], [p[1]["prior"] for p in points], width=0.4, label="capitals (prior)")
            if task in base:
                axis.axhline(base[task]["prior"]["pass_rate"], color="gray", linestyle=":", label="capitals, base model")
            axis.set_xticks(list(x), labels)
            axis.set_title(f"task: {task}")
            axis.set_ylim(0, 1.05)
        axes[0].set_ylabel("share of held-out prompts")
        axes[0].legend(fontsize=8, loc="upper left")
        figure.suptitle("SmolLM2-135M-Instruct, SDFT 16 steps, lr 1e-3, by teacher template (mean over seeds)")
        figure.tight_layout()
        figure.savefig(plot, dpi=110)
        lines.append(f"\nplot: {plot}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "outputs" / "SmolLM2-135M-Instruct"), help="sd-plugin demo-model output")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "teacher_templates.jsonl"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "teacher_templates.png"))
    parser.add_argument("--tasks", default="contact,city")
    parser.add_argument("--templates", default="paper,handpicked,auto", help="paper, handpicked, auto or template names")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skip", type=int, default=0, help="num_loss_tokens_to_skip of every run")
    parser.add_argument("--rows", type=int, default=16, help="training rows of the teacher-check table")
    parser.add_argument("--scores-only", action="store_true", help="only the teacher check of every template")
    parser.add_argument("--report", action="store_true", help="print the tables / write the plot from --results only")
    args = parser.parse_args(argv)
    results = Path(args.results)
    done = lambda key: key in {row.get("key") for row in read_results(results)}  # noqa: E731
    if not args.report:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        tasks = args.tasks.split(",")
        for task in tasks:
            if not done(f"scores/{task}/rows{args.rows}"):
                row = teacher_scores(args.model, task, args.rows)
                append(results, row)
                print(json.dumps(row), flush=True)
        if not args.scores_only:
            for task in tasks:
                if not done(f"base/{task}"):
                    model, tokenizer = load(args.model)
                    append(results, {"key": f"base/{task}", "task": task, **score_sets(model, tokenizer, task)})
            for seed in [int(s) for s in args.seeds.split(",")]:
                for task in tasks:
                    for template in args.templates.split(","):
                        template = TASKS[task]["handpicked"] if template == "handpicked" else template
                        key = f"sdft/{task}/{template}/seed{seed}/steps{args.steps}/lr{args.lr:g}/skip{args.skip}"
                        if done(key):
                            continue
                        run = {"key": key, "task": task, "template": template, "seed": seed, "steps": args.steps,
                               "lr": args.lr, "skip": args.skip}
                        row = train_one(args.model, run, REPO / "outputs" / "bench_teacher_templates")
                        append(results, row)
                        print(json.dumps(row), flush=True)
    print(report(results, None if args.scores_only else Path(args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
