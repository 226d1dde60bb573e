"""Benchmark: SDPO's training reward on a real model (SmolLM2-135M-Instruct, `sd-plugin demo-model`), CPU, side by
side with TRL's own `trl.experimental.sdpo.SDPOTrainer`.

RL with a self-teacher on 32 "What is the capital of X?" questions the base model mostly answers (greedy: 75%),
scored by `sd_plugin.demo_task:AnswerContainsVerifier` (reward 1 when the reply names the capital; its feedback on
a miss is "The answer should be <capital>."). 4 questions x 4 rollouts per step at temperature 1 (at most 24
tokens), LoRA r 8; the teacher sees a successful sibling and/or the feedback (the SDPO paper's reprompt template)
and scores the same tokens. Each run appends one JSON line to --results (per-step training reward, completion
length, held-out greedy pass rate on 32 other capitals before / after); `--report` prints the table and draws the
reward-per-step plot.

    python benchmarks/bench_sdpo_demo.py --setting paper                  # distillation only: the collapse
    python benchmarks/bench_sdpo_demo.py --setting trl-defaults --trainer trl
    python benchmarks/bench_sdpo_demo.py --setting paper --diagnose       # teacher vs student entropies, no training
    python benchmarks/bench_sdpo_demo.py --report

`--setting` picks a named row of SETTINGS; --steps / --lr / --seed / --teacher-model-kind / --sdpo-mode override it.
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
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VERIFIER = "sd_plugin.demo_task:AnswerContainsVerifier"

# Named settings (options of SDPOConfig, plus lr / steps). TRL's SDPOTrainer takes the ones it has
# (`trl_ok`): it has no per-rollout environment feedback (only a per-prompt `privileged_context` column), no
# teacher top-K support and no uncertain-token mask.
PAPER = dict(distillation_alpha=0.5, distillation_mode="topk_logits", distillation_topk=100, distillation_add_tail=True,
             teacher_model_kind="base", include_environment_feedback=True)
SETTINGS = {
    # The SDPO paper's loss (JSD, student top-100 + tail), base teacher, sibling solution and feedback.
    "paper": dict(PAPER),
    # The same with only a successful sibling in the teacher's context: rows without one get no loss.
    "sibling-only": dict(PAPER, include_environment_feedback=False),
    # TRL's defaults: reverse KL on the sampled token (IS-clipped), EMA teacher at 0.05, no feedback.
    "trl-defaults": dict(distillation_alpha=1.0, distillation_mode="sampled_token", teacher_model_kind="ema",
                         teacher_update_rate=0.05, include_environment_feedback=False),
    # The paper's loss at a 10x lower learning rate, twice the steps.
    "paper-low-lr": dict(PAPER, learning_rate=1e-4, steps=16),
    # The teacher's top-20 as the support (the paper's rich-feedback K), renormalized.
    "teacher-topk": dict(PAPER, distillation_support="teacher", distillation_topk=20, distillation_add_tail=False),
    # Distil only the tokens where the teacher is at least as sure as the student.
    "confident-teacher": dict(PAPER, mask_uncertain_teacher_tokens=True),
    # A teacher that trails the student: EMA at rate 0.05 (the paper's trust region in weight space).
    "paper-ema": dict(PAPER, teacher_model_kind="ema", teacher_update_rate=0.05),
    # The SDPO paper's rich-feedback runs (the verifier's feedback in the teacher's context, as here): reverse KL
    # (alpha 1) on the student's top-20 with the tail bucket.
    "rich-feedback": dict(PAPER, distillation_alpha=1.0, distillation_topk=20),
    # GRPO + distillation (the reference that learns).
    "hybrid": dict(PAPER, sdpo_mode="hybrid", distillation_weight=0.5),  # TRL's blend, both terms equally
    # GRPO alone (no distillation): what the hybrid's GRPO term does by itself.
    "grpo": dict(PAPER, sdpo_mode="policy", teacher_model_kind="live"),
}
TRL_SUPPORTED = {"sibling-only", "trl-defaults", "paper-ema"}


def run_key(setting: str, trainer: str, options: dict, seed: int) -> str:
    return f"{setting}/{trainer}/lr{options['learning_rate']:g}/steps{options['steps']}/seed{seed}"


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def held_out_pass_rates(model, tokenizer, max_new_tokens: int, samples: int = 4) -> tuple[float, float]:
    """On the 32 held-out capitals (`capitals_heldout.jsonl`), the product's evaluation: the greedy pass rate, and
    that of `samples` answers per question at temperature 1 (what training's rollouts are), seeded."""
    import torch

    from sd_plugin.evaluation import PromptSet
    from sd_plugin.rollout import SamplingOptions

    held_out = PromptSet("held_out", str(DATA / "capitals_heldout.jsonl"), VERIFIER, tokenizer, "prompt", 1024)
    eos = [tokenizer.eos_token_id]
    greedy = held_out.score(model, tokenizer, max_new_tokens, eos)[0]["reward"]
    sampling = SamplingOptions(max_new_tokens=max_new_tokens, temperature=1.0, num_generations=samples)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return greedy, held_out.score(model, tokenizer, max_new_tokens, eos, sampling)[0]["reward"]


def ours(args, options: dict, seed: int, diagnose: bool):
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from sd_plugin import SDPOConfig, SDPOTrainer
    from sd_plugin.testing import read_jsonl

    torch.manual_seed(seed)
    model, tokenizer = load(args.model)
    sdpo = {k: v for k, v in options.items() if k not in ("steps", "learning_rate")}
    config = SDPOConfig(
        output_dir=str(REPO / "outputs" / "bench_sdpo_demo"), max_steps=options["steps"],
        per_device_train_batch_size=args.batch * args.num_generations,  # completions, as TRL counts them
        num_generations=args.num_generations, learning_rate=options["learning_rate"], lr_scheduler_type="constant_with_warmup",
        warmup_steps=2, seed=seed, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        max_completion_length=args.max_completion_length, max_prompt_length=128, temperature=args.temperature,
        verifier=VERIFIER, log_completions=not diagnose, num_completions_to_print=4, **sdpo,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    data = Dataset.from_list(read_jsonl(DATA / "capitals_test.jsonl"))
    trainer = SDPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    if diagnose:
        return trainer, None
    trainer.train()
    history = [{"step": e["step"], "reward": e["self_distillation/reward_mean"], "length": e["completions/mean_length"],
                "clipped": e["completions/clipped_ratio"]}
               for e in trainer.state.log_history if "self_distillation/reward_mean" in e]
    return trainer, history


def trl(args, options: dict, seed: int):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    from sd_plugin.demo_task import AnswerContainsVerifier
    from sd_plugin.testing import read_jsonl

    torch.manual_seed(seed)
    model, tokenizer = load(args.model)
    verifier = AnswerContainsVerifier()

    def capital_reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [verifier(None, text, {"answer": gold}).reward for text, gold in zip(texts, answer)]

    assert not options.get("include_environment_feedback"), "TRL has no per-rollout feedback"
    names = ("distillation_alpha", "distillation_mode", "distillation_topk", "distillation_add_tail",
             "teacher_model_kind", "teacher_update_rate")
    config = SDPOConfig(
        output_dir=str(REPO / "outputs" / "bench_sdpo_demo_trl"), max_steps=options["steps"],
        per_device_train_batch_size=args.batch * args.num_generations, num_generations=args.num_generations,
        learning_rate=options["learning_rate"], lr_scheduler_type="constant_with_warmup", warmup_steps=2, seed=seed,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        max_completion_length=args.max_completion_length, temperature=args.temperature, bf16=False,  # fp32 like ours
        include_environment_feedback=False, **{k: options[k] for k in names if k in options},
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    data = Dataset.from_list(read_jsonl(DATA / "capitals_test.jsonl"))
    trainer = SDPOTrainer(model=model, reward_funcs=capital_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    # TRL's SDPOTrainer logs the reward under the same name as ours (GRPO's `reward` where that is missing).
    history = [{"step": e["step"], "reward": e.get("self_distillation/reward_mean", e.get("reward")),
                "length": e["completions/mean_length"], "clipped": e["completions/clipped_ratio"]}
               for e in trainer.state.log_history if "completions/mean_length" in e]
    if not history or any(h["reward"] is None for h in history):
        raise RuntimeError(f"no training reward in TRL's log history; keys logged: {sorted(trainer.state.log_history[0])}")
    return trainer, history


def diagnose(trainer, batches: int) -> dict:
    """Teacher vs student on rollouts of the current student, per kind of rollout (no training step).

    Per token: each one's entropy, how often the teacher is less sure than the student, the teacher - student
    log-prob of the sampled token, and both models' probability of the gold answer's first token (where the
    teacher's mass goes). Per rollout: whether the teacher, sampling greedily from its own context, answers.
    """
    import torch

    from sd_plugin.rows import left_pad
    from sd_plugin.teacher import output_head
    from sd_plugin.trainers.sdpo import token_entropies
    from sd_plugin.trainers.step import completion_hidden_states
    from sd_plugin.verifiers import safe_verify

    tokenizer, model = trainer.processing_class, trainer.model
    unwrapped = trainer.accelerator.unwrap_model(model)
    stats: dict[str, dict[str, float]] = {}
    examples: list[str] = []
    loader = iter(trainer.get_train_dataloader())
    for _ in range(batches):
        inputs = trainer._prepare_inputs(next(loader))
        batch = trainer.prepare_step(model, inputs)
        rollouts = batch.rollouts
        rows = [i for i, p in enumerate(batch.teacher_prompts) if p is not None]
        if not rows:
            continue
        teacher_ids, teacher_mask = left_pad([batch.teacher_prompts[i] for i in rows], tokenizer.pad_token_id)
        ids, mask = rollouts.completion_ids[rows], rollouts.completion_mask[rows]
        groups = rollouts.prompt_index[rows]
        with torch.no_grad():
            student = completion_hidden_states(unwrapped, model, batch.prompt_ids[groups], batch.prompt_mask[groups], ids, mask)
            weight, bias = output_head(unwrapped)
            student_logits = torch.nn.functional.linear(student, weight, bias).float()
            with trainer.teacher.scoring(unwrapped) as teacher_model:
                teacher = completion_hidden_states(teacher_model, teacher_model, teacher_ids, teacher_mask, ids, mask)
                teacher_weight, teacher_bias = output_head(teacher_model)
                teacher_logits = torch.nn.functional.linear(teacher, teacher_weight, teacher_bias).float()
                greedy = teacher_model.generate(input_ids=teacher_ids, attention_mask=teacher_mask, do_sample=False,
                                                max_new_tokens=trainer.options.max_completion_length,
                                                pad_token_id=tokenizer.pad_token_id, eos_token_id=trainer.eos_token_ids)
        h_student = token_entropies(student, weight, bias, mask, 64)
        h_teacher = token_entropies(teacher, teacher_weight, teacher_bias, mask, 64)
        s_logp, t_logp = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
        sampled_gap = (t_logp - s_logp).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        for n, i in enumerate(rows):
            verdict, context = batch.verdicts[i], batch.teacher_contexts[i]
            kind = ("correct" if verdict.correct else "failed") + (", sibling" if context.startswith("solution:") else ", feedback only")
            record = batch.records[int(rollouts.prompt_index[i])]
            gold = " " + str(record["answer"])
            gold_token = tokenizer(gold, add_special_tokens=False)["input_ids"][0]
            m = mask[n].bool()
            teacher_text = tokenizer.decode(greedy[n, teacher_ids.shape[1]:], skip_special_tokens=True)
            teacher_correct = safe_verify(trainer.verifier, record["messages"], teacher_text, record).reward >= 1.0
            s = stats.setdefault(kind, {k: 0.0 for k in ("rollouts", "tokens", "h_student", "h_teacher", "teacher_less_sure",
                                                           "logp_gap", "gold_student", "gold_teacher", "teacher_greedy_correct")})
            s["rollouts"] += 1
            s["tokens"] += m.sum().item()
            s["h_student"] += h_student[n][m].sum().item()
            s["h_teacher"] += h_teacher[n][m].sum().item()
            s["teacher_less_sure"] += (h_teacher[n][m] > h_student[n][m]).sum().item()
            s["logp_gap"] += sampled_gap[n][m].sum().item()
            s["gold_student"] += s_logp[n][m][:, gold_token].exp().max().item()
            s["gold_teacher"] += t_logp[n][m][:, gold_token].exp().max().item()
            s["teacher_greedy_correct"] += float(teacher_correct)
            if not verdict.correct and len(examples) < 6:
                examples.append(f"[{kind}] rollout: {tokenizer.decode(ids[n][m])!r}\n    teacher greedy: {teacher_text!r}")
    table = {}
    for kind, s in sorted(stats.items()):
        tokens, count = max(s["tokens"], 1), max(s["rollouts"], 1)
        table[kind] = {"rollouts": int(s["rollouts"]), "tokens": int(s["tokens"]), "H_student": s["h_student"] / tokens,
                       "H_teacher": s["h_teacher"] / tokens, "teacher_less_sure": s["teacher_less_sure"] / tokens,
                       "logp_teacher_minus_student": s["logp_gap"] / tokens, "gold_p_student": s["gold_student"] / count,
                       "gold_p_teacher": s["gold_teacher"] / count, "teacher_greedy_pass": s["teacher_greedy_correct"] / count}
    return {"table": table, "examples": examples}


def format_diagnosis(label: str, diagnosis: dict) -> str:
    lines = [f"\n{label}", "| rollouts | n | tokens | H student | H teacher | teacher less sure | log p_t - log p_s (sampled) "
             "| max p(gold 1st token) student | teacher | teacher greedy answers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in diagnosis["table"].items():
        lines.append(f"| {kind} | {r['rollouts']} | {r['tokens']} | {r['H_student']:.2f} | {r['H_teacher']:.2f} | "
                     f"{r['teacher_less_sure']:.2f} | {r['logp_teacher_minus_student']:+.2f} | {r['gold_p_student']:.2f} | "
                     f"{r['gold_p_teacher']:.2f} | {r['teacher_greedy_pass']:.2f} |")
    lines += diagnosis["examples"]
    return "\n".join(lines)


def watch_summary(row: dict) -> str:
    """The collapse watch's first warning on the training reward, or '-' (not recorded for TRL and older rows)."""
    if "collapse_warnings" not in row:
        return "not recorded"
    steps = [f["step"] for f in row["collapse_warnings"] if f["metric"].startswith("self_distillation/")]
    return f"warned at step {steps[0]}" if steps else "silent"


def report(path: Path, plot: Path | None) -> str:
    rows = read_results(path)
    runs = [r for r in rows if "history" in r]
    lines = ["| run | reward per step | first 3 -> last 3 steps | held-out greedy before -> after (sampled) | length first -> last | "
             "collapse watch | s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        rewards = [h["reward"] for h in r["history"]]
        first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
        held = f"{r['held_out_before']:.3f} -> {r['held_out_after']:.3f}" if r.get("held_out_after") is not None else "-"
        if r.get("held_out_sampled_after") is not None:
            held += f" (sampled {r['held_out_sampled_before']:.3f} -> {r['held_out_sampled_after']:.3f})"
        lines.append(f"| {r['key']} | {' '.join(f'{x:.2f}' for x in rewards)} | {first:.2f} -> {last:.2f} | {held} | "
                     f"{r['history'][0]['length']:.1f} -> {r['history'][-1]['length']:.1f} | {watch_summary(r)} | "
                     f"{r['seconds']:.0f} |")
    for r in rows:
        if "diagnosis" in r:
            lines.append(format_diagnosis(r["key"], r["diagnosis"]))
    if plot is not None and runs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(8, 5))
        for r in runs:
            style = "--" if "/trl/" in r["key"] else "-"
            axis.plot([h["step"] for h in r["history"]], [h["reward"] for h in r["history"]], style, marker="o",
                      markersize=3, label=r["key"])
        axis.set_xlabel("step")
        axis.set_ylabel("training reward (4 x 4 rollouts, T 1)")
        axis.set_title("SDPO on SmolLM2-135M-Instruct, capitals (dashed: TRL's SDPOTrainer)")
        axis.legend(fontsize=6)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(plot, dpi=110)
        lines.append(f"\nplot: {plot}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "outputs" / "SmolLM2-135M-Instruct"), help="sd-plugin demo-model output")
    parser.add_argument("--setting", default="paper", choices=sorted(SETTINGS))
    parser.add_argument("--trainer", default="ours", choices=("ours", "trl"))
    parser.add_argument("--steps", type=int, default=None, help="default: the setting's (8)")
    parser.add_argument("--lr", type=float, default=None, help="default: the setting's (1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-model-kind", default=None, help="override the setting's teacher")
    parser.add_argument("--sdpo-mode", default=None, help="override: distill | policy | hybrid")
    parser.add_argument("--batch", type=int, default=4, help="questions per step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--diagnose", action="store_true", help="teacher vs student on 8 batches of rollouts of the base "
                        "model, then (with --diagnose-after) of the trained one")
    parser.add_argument("--diagnose-after", action="store_true", help="train, then diagnose the trained student")
    parser.add_argument("--no-held-out", action="store_true", help="skip the held-out greedy evaluation")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "sdpo_demo.jsonl"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "sdpo_demo.png"))
    parser.add_argument("--report", action="store_true", help="print the table of --results and draw --plot")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if args.report:
        print(report(results, Path(args.plot) if args.plot else None))
        return 0

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    options = {"learning_rate": 1e-3, "steps": 8, **SETTINGS[args.setting]}
    for key, value in (("steps", args.steps), ("learning_rate", args.lr), ("teacher_model_kind", args.teacher_model_kind),
                       ("sdpo_mode", args.sdpo_mode)):
        if value is not None:
            options[key] = value
    if args.trainer == "trl" and args.setting not in TRL_SUPPORTED:
        parser.error(f"--trainer trl runs the settings TRL has: {sorted(TRL_SUPPORTED)}")
    key = run_key(args.setting, args.trainer, options, args.seed)
    start = time.time()
    row = {"key": key, "setting": args.setting, "trainer": args.trainer, "seed": args.seed, "options": options}
    if args.diagnose:
        trainer, _ = ours(args, options, args.seed, diagnose=True)
        row["key"] = f"diagnosis/{args.setting}/base-model"
        row["diagnosis"] = diagnose(trainer, 8)
        print(format_diagnosis(row["key"], row["diagnosis"]))
    else:
        held_out = not args.no_held_out
        if held_out:
            model, tokenizer = load(args.model)
            row["held_out_before"], row["held_out_sampled_before"] = held_out_pass_rates(model, tokenizer,
                                                                                          args.max_completion_length)
            del model
        if args.trainer == "ours":
            trainer, history = ours(args, options, args.seed, diagnose=False)
        else:
            trainer, history = trl(args, options, args.seed)
        row["history"] = history
        row["seconds"] = round(time.time() - start, 1)
        if args.trainer == "ours":  # what the product said during the run (sd_plugin.watch.CollapseWatch)
            row["collapse_warnings"] = trainer.collapse_watch.findings
        if held_out:
            row["held_out_after"], row["held_out_sampled_after"] = held_out_pass_rates(
                trainer.model, trainer.processing_class, args.max_completion_length)
        if args.diagnose_after and args.trainer == "ours":
            row["diagnosis_after"] = diagnose(trainer, 8)
            print(format_diagnosis(f"{key}: after training", row["diagnosis_after"]))
        print(f"\n{key}: {time.time() - start:.0f} s")
        print(report_rows([row]))
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    return 0


def report_rows(rows: list[dict]) -> str:
    lines = ["| step | training reward | completion length | clipped |", "|---|---|---|---|"]
    for r in rows:
        for h in r["history"]:
            lines.append(f"| {h['step']} | {h['reward']:.3f} | {h['length']:.1f} | {h['clipped']:.2f} |")
        if r.get("held_out_after") is not None:
            lines.append(f"held-out greedy pass rate: {r['held_out_before']:.3f} -> {r['held_out_after']:.3f}")
        if r.get("held_out_sampled_after") is not None:
            lines.append(f"held-out sampled pass rate (4 per question, T 1): {r['held_out_sampled_before']:.3f} -> "
                         f"{r['held_out_sampled_after']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
