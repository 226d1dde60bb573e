"""Benchmark: SD-Zero end to end on a real model (SmolLM2-135M-Instruct, `sd-plugin demo-model`), CPU.

The task: "What is the capital of X?" on the 32 training questions (capitals_test.jsonl; greedy 75%), scored by
`sd_plugin.demo_task:AnswerContainsVerifier`; held-out: 32 other countries (capitals_heldout.jsonl); prior probe:
32 small additions ("What is 7 + 5?"), which nothing here trains.

1. collect-revisions from the demo model itself (`sd_plugin.revisions.collect_revisions`, T 1, 4 revisions per
   problem, both outcomes revised): the revision yield;
2. SRT (`phase: srt`, joint objective) on the verified revisions, LoRA, merged;
3. self-distillation (`phase: distill`) of the merged SRT model, the frozen SRT model (the reviser) as teacher.

Compared with SFT on the same verified revisions alone (chat(x) -> y_revised: SDFT's cross-entropy rows,
`lambda_on_policy: 0`) and with SDFT from demonstrations ("The capital of X is Y.", the base model with the
demonstration in context as teacher). Every model is scored on the three sets, greedy, and on the held-out set also
sampled (T 1, 2 samples per question). Each stage appends a JSON line to --results and is skipped when already there (resumable).

    python benchmarks/bench_sdzero_demo.py            # all stages, then the table
    python benchmarks/bench_sdzero_demo.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "example_configs" / "assets" / "data"
VERIFIER = "sd_plugin.demo_task:AnswerContainsVerifier"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
MAX_NEW_TOKENS = 32
STAGES = ("base", "collect", "srt", "distill", "sft-revisions", "sdft")


def arithmetic_records(count: int = 32, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(rng.randint(2, 20), rng.randint(2, 20)) for _ in range(count)]
    return [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)} for a, b in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sampled_pass_rate(model, tokenizer, prompt_set, samples: int = 2, seed: int = 0) -> float:
    """Mean verifier reward of `samples` answers per prompt at temperature 1 (the reward RL training sees)."""
    import torch

    from sd_plugin.rows import left_pad
    from sd_plugin.verifiers import safe_verify

    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    rewards = []
    with torch.no_grad():
        for start in range(0, len(prompt_set.prompts), 16):
            ids, mask = left_pad(prompt_set.prompts[start:start + 16], tokenizer.pad_token_id)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=samples, max_new_tokens=MAX_NEW_TOKENS,
                                 eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
            for n, row in enumerate(out[:, ids.shape[1]:]):
                record = prompt_set.records[start + n // samples]
                text = tokenizer.decode(row, skip_special_tokens=True)
                fields = {k: v for k, v in record.items() if k not in ("messages", "tools")}
                rewards.append(safe_verify(prompt_set.verifier, record["messages"], text, fields).reward)
    model.train(was_training)
    return sum(rewards) / len(rewards)


def evaluate(model, tokenizer, work: Path) -> dict:
    """Greedy and sampled pass rates on the training questions, the held-out capitals and the arithmetic probe."""
    from sd_plugin.evaluation import PromptSet

    files = {"train": DATA / "capitals_test.jsonl", "held_out": DATA / "capitals_heldout.jsonl",
             "prior": write_jsonl(work / "arithmetic.jsonl", arithmetic_records())}
    scores = {}
    for name, path in files.items():
        prompt_set = PromptSet(name, str(path), VERIFIER, tokenizer, "prompt", 1024)
        greedy = prompt_set.score(model, tokenizer, MAX_NEW_TOKENS, [tokenizer.eos_token_id])[0]["reward"]
        # Sampled answers on the held-out set only (the CPU budget of a shared machine).
        scores[name] = {"greedy": greedy, "sampled": sampled_pass_rate(model, tokenizer, prompt_set) if name == "held_out" else None}
    return scores


def load(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), AutoTokenizer.from_pretrained(str(model_dir))


def common(work: Path, name: str, steps: int, lr: float) -> dict:
    return dict(output_dir=str(work / name), max_steps=steps, learning_rate=lr, lr_scheduler_type="constant_with_warmup",
                warmup_steps=2, seed=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                disable_tqdm=True)


def train_srt(args, work: Path, model_dir: str, revisions: Path):
    """Phase 1: SRT (joint objective) on the kept revisions; returns the trained PEFT model."""
    from datasets import load_dataset
    from peft import LoraConfig

    from sd_plugin import SDZeroConfig, SDZeroTrainer

    model, tokenizer = load(model_dir)
    rows = load_dataset("json", data_files=str(revisions), split="train")
    config = SDZeroConfig(phase="srt", per_device_train_batch_size=8, max_prompt_length=128, max_completion_length=160,
                          **common(work, "srt", args.srt_steps, args.srt_lr))
    trainer = SDZeroTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer.model, tokenizer, {"first_loss": losses[0], "last_loss": losses[-1], "rows": len(trainer.train_dataset)}


def train_distill(args, work: Path, srt_dir: Path):
    """Phase 2: self-distillation; the teacher is the frozen SRT model (the merged model with the new adapter off)."""
    from datasets import Dataset
    from peft import LoraConfig

    from sd_plugin import SDZeroConfig, SDZeroTrainer
    from sd_plugin.testing import read_jsonl

    model, tokenizer = load(srt_dir)
    config = SDZeroConfig(phase="distill", verifier=VERIFIER, per_device_train_batch_size=4, num_generations=2,
                          max_prompt_length=128, max_completion_length=MAX_NEW_TOKENS, max_teacher_prompt_length=512,
                          **common(work, "distill", args.distill_steps, args.distill_lr))
    trainer = SDZeroTrainer(model=model, args=config, train_dataset=Dataset.from_list(read_jsonl(DATA / "capitals_test.jsonl")),
                            processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    correct = [e["correct_fraction"] for e in trainer.state.log_history if "correct_fraction" in e]
    return trainer.model, tokenizer, {"training_reward": correct}


def train_sdft(args, work: Path, model_dir: str, records: list[dict], name: str, cross_entropy: bool):
    """SFT on demonstrations (SDFT's cross-entropy rows) or on-policy SDFT with the demonstration in the teacher's context."""
    from datasets import Dataset
    from peft import LoraConfig

    from sd_plugin import SDFTConfig, SDFTTrainer

    model, tokenizer = load(model_dir)
    if cross_entropy:
        settings = dict(lambda_on_policy=0.0, learning_rate=args.srt_lr, max_steps=args.srt_steps)
    else:
        settings = dict(learning_rate=args.distill_lr, max_steps=args.distill_steps, teacher_model_kind="base",
                        num_loss_tokens_to_skip=0)
    config = SDFTConfig(per_device_train_batch_size=8 if cross_entropy else 4, max_prompt_length=128,
                        max_completion_length=MAX_NEW_TOKENS, max_teacher_prompt_length=512,
                        **{**common(work, name, 0, 0.0), **settings})
    trainer = SDFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                          peft_config=LoraConfig(**LORA))
    trainer.train()
    return trainer.model, tokenizer, {}


def read_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {row["stage"]: row for row in map(json.loads, path.read_text().splitlines()) if row}


def report(path: Path) -> str:
    rows = read_results(path)
    lines = []
    if "collect" in rows:
        c = rows["collect"]
        lines.append(f"collect-revisions: {c['attempted']} problems, initially correct {c['initially_correct']}, "
                     f"revised {c['revised']} x {c['num_revisions']} revisions, kept {c['kept']} "
                     f"(after a correct y_init {c['kept_after_correct']}/{c['revisions_after_correct']}, "
                     f"after an incorrect one {c['kept_after_incorrect']}/{c['revisions_after_incorrect']})")
    labels = {"base": "base model", "srt": "SD-Zero phase 1: SRT on the kept revisions",
              "distill": "SD-Zero phase 2: self-distillation from the SRT model",
              "sft-revisions": "SFT on the kept revisions alone (x -> y_revised)",
              "sdft": "SDFT from demonstrations (base teacher)"}
    lines += ["", "| model | train questions (greedy) | held-out (greedy) | held-out (T 1, 2 samples) | prior: sums (greedy) | s |",
              "|---|---|---|---|---|---|"]
    for stage, label in labels.items():
        if stage in rows:
            s = rows[stage]["scores"]
            lines.append(f"| {label} | {s['train']['greedy']:.3f} | {s['held_out']['greedy']:.3f} | {s['held_out']['sampled']:.3f} | "
                         f"{s['prior']['greedy']:.3f} | {rows[stage].get('seconds', 0):.0f} |")
    if "distill" in rows:
        lines.append("\ndistill phase training reward per step: " + " ".join(f"{x:.2f}" for x in rows["distill"]["training_reward"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "outputs" / "SmolLM2-135M-Instruct"), help="sd-plugin demo-model output")
    parser.add_argument("--work", default=str(REPO / "outputs" / "bench_sdzero_demo"), help="revisions, models")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "sdzero_demo.jsonl"))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--num-revisions", type=int, default=4)
    parser.add_argument("--srt-steps", type=int, default=16)
    parser.add_argument("--srt-lr", type=float, default=3e-4)
    parser.add_argument("--distill-steps", type=int, default=8)
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="phase 2 (and SDFT); 3e-4 lowered the held-out reward")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    results, work = Path(args.results), Path(args.work)
    if args.report:
        print(report(results))
        return 0

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    done = read_results(results)
    revisions = work / "revisions.jsonl"
    srt_dir = work / "srt-merged"

    def record(stage: str, row: dict) -> None:
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"stage": stage, **row}) + "\n")
        done[stage] = row
        print(f"{stage}: {row}", flush=True)

    for stage in args.stages.split(","):
        if stage in done and not (stage == "srt" and not srt_dir.is_dir()):
            continue
        start = time.time()
        if stage == "base":
            model, tokenizer = load(args.model)
            record(stage, {"scores": evaluate(model, tokenizer, work)})
        elif stage == "collect":
            from sd_plugin.revisions import RevisionOptions, collect_revisions

            model, tokenizer = load(args.model)
            options = RevisionOptions(verifier=VERIFIER, num_revisions=args.num_revisions, max_new_tokens=MAX_NEW_TOKENS,
                                      batch_size=8, seed=0)
            summary = collect_revisions(model, tokenizer, str(DATA / "capitals_test.jsonl"), revisions, options, progress=False)
            attempts = [json.loads(line) for line in Path(summary.attempts_log).read_text().splitlines() if line.strip()]
            split = {True: [0, 0], False: [0, 0]}
            for a in attempts:
                split[a["initially_correct"]][0] += len(a["kept"])
                split[a["initially_correct"]][1] += args.num_revisions
            record(stage, {"attempted": summary.attempted, "initially_correct": summary.initially_correct,
                           "revised": summary.revised, "kept": summary.kept, "num_revisions": args.num_revisions,
                           "kept_after_correct": split[True][0], "revisions_after_correct": split[True][1],
                           "kept_after_incorrect": split[False][0], "revisions_after_incorrect": split[False][1],
                           "seconds": round(time.time() - start, 1)})
        elif stage == "srt":
            model, tokenizer, info = train_srt(args, work, args.model, revisions)
            merged = model.merge_and_unload()
            merged.save_pretrained(srt_dir)
            tokenizer.save_pretrained(srt_dir)
            record(stage, {**info, "scores": evaluate(merged, tokenizer, work), "seconds": round(time.time() - start, 1)})
        elif stage == "distill":
            model, tokenizer, info = train_distill(args, work, srt_dir)
            record(stage, {**info, "scores": evaluate(model, tokenizer, work), "seconds": round(time.time() - start, 1)})
        elif stage == "sft-revisions":
            kept = [json.loads(line) for line in revisions.read_text().splitlines() if line.strip()]
            rows = [{"prompt": r["prompt"], "demonstration": r["y_revised"]} for r in kept]
            model, tokenizer, info = train_sdft(args, work, args.model, rows, stage, cross_entropy=True)
            record(stage, {**info, "scores": evaluate(model, tokenizer, work), "seconds": round(time.time() - start, 1)})
        elif stage == "sdft":
            from sd_plugin.testing import read_jsonl

            rows = [{"prompt": r["prompt"], "demonstration": f"The capital of {r['prompt'][0]['content'][23:-1]} is {r['answer']}."}
                    for r in read_jsonl(DATA / "capitals_test.jsonl")]
            model, tokenizer, info = train_sdft(args, work, args.model, rows, stage, cross_entropy=False)
            record(stage, {**info, "scores": evaluate(model, tokenizer, work), "seconds": round(time.time() - start, 1)})
        else:
            parser.error(f"unknown stage {stage!r}: {STAGES}")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
