"""Benchmark: sd_plugin's SDFTTrainer against TRL's `trl.experimental.sdft.SDFTTrainer` on CPU.

Both trainers train the same tiny random Qwen3 (hidden 256, 4 layers, Qwen's real vocabulary size 151,936)
with the same LoRA adapter, the base model as teacher, batch 1, one rollout per prompt, a student prompt of
exactly 1,024 tokens, a teacher prompt of that prompt + "\\n\\n" + a 256-token demonstration, and rollouts
of exactly 256 new tokens (`min_new_tokens` suppresses the end-of-turn token in both). Both see the very
same token ids: TRL tokenizes the prompt strings itself, and our rows are those strings tokenized by the
same tokenizer. The tokenizer is the repository's tiny BPE (1,024 tokens) and only writes the prompts;
the model's vocabulary is 151,936, so the rollouts sample from all 151,936 ids.

Each run is a separate subprocess (runs alternate TRL / ours). In it, a small pre-warm step of the same trainer
class runs first (lazy imports, thread start-up), then `--warmup` untimed and `--steps` timed full-size steps.
The subprocess reports its peak RSS over the whole process (imports, model, training), the RSS just before
training, and the training's own peak (peak minus that RSS; the kernel's peak counter is reset right before
`trainer.train()`). Peak RSS is VmHWM from /proc/self/status: getrusage's ru_maxrss is seeded by exec() with the
parent's RSS. Workers run with MALLOC_MMAP_THRESHOLD_=1 MiB so RSS tracks live tensors (glibc would keep freed
1-32 MiB blocks on its heap); --glibc-default turns that off.

A second table shows how memory scales with the completion length at a fixed loss chunk size:
  - loss only: `chunked_distillation_loss` forward + backward on random hidden states
    (V = 151,936, H = 256 unless --quick), peak RSS growth over the inputs;
  - a full training step (generation + teacher forward + student forward + loss + backward + AdamW) of OUR
    trainer on a smaller model (hidden 64, 2 layers, V = 32,768: 16k rollout tokens on 2 CPU cores).

Usage (times on this project's shared 2-core machine):
    python benchmarks/bench_sdft_vs_trl.py                         # everything, ~14 min (TRL steps: ~2 min each)
    python benchmarks/bench_sdft_vs_trl.py --quick                 # ~6 min
    python benchmarks/bench_sdft_vs_trl.py --steps 2 --warmup 1    # the table in benchmarks/README.md, ~25 min
    python benchmarks/bench_sdft_vs_trl.py --modes full --skip-scaling
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "example_configs" / "assets" / "tiny-qwen3"
RESULT_PREFIX = "BENCH_RESULT "
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_profile import PHASES, PhaseClock  # noqa: E402

QWEN_VOCAB = 151_936
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOPK = 100
ALPHA = 1.0  # reverse KL, as in seeds/001
SKIP_TOKENS = 3


# ---------------------------------------------------------------------------------------------- helpers
def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM from /proc/self/status, else getrusage's ru_maxrss.

    ru_maxrss (RUSAGE_SELF) is not enough on Linux: exec() seeds it with the RSS of the parent process at fork
    time, so a worker started by a big parent reports the parent's size; VmHWM belongs to this process only and
    is the counter that `reset_peak_rss` resets.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now (from /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def single_token_words(tokenizer) -> list[str]:
    """Vocabulary entries that encode to exactly one token when preceded by a space (" word")."""
    words = []
    for token, token_id in tokenizer.get_vocab().items():
        if token.startswith("Ġ") and token[1:].isalpha() and len(token) > 2:
            text = " " + token[1:]
            if tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]:
                words.append(text)
    return sorted(words)


def exact_length_text(words: list[str], n_tokens: int, rng: random.Random, tokenizer) -> str:
    """A string of `n_tokens` single-token words (checked by re-tokenizing)."""
    text = "".join(rng.choice(words) for _ in range(n_tokens))
    length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if length != n_tokens:
        raise RuntimeError(f"expected {n_tokens} tokens, the tokenizer made {length}")
    return text


def make_records(tokenizer, n_rows: int, prompt_tokens: int, demonstration_tokens: int, seed: int = 0):
    """Rows for both trainers: TRL's strings and our token ids, identical after tokenization."""
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    trl_rows, our_rows = [], []
    for _ in range(n_rows):
        prompt = exact_length_text(words, prompt_tokens, rng, tokenizer)
        demonstration = exact_length_text(words, demonstration_tokens, rng, tokenizer)
        teacher_text = f"{prompt}\n\n{demonstration}"  # TRL's default teacher_prompt_template
        trl_rows.append({"prompt": prompt, "privileged_context": demonstration})
        our_rows.append({
            "input_ids": tokenizer(prompt)["input_ids"],
            "teacher_input_ids": tokenizer(teacher_text)["input_ids"],
            "demonstration_ids": tokenizer(demonstration, add_special_tokens=False)["input_ids"],
        })
    return trl_rows, our_rows


def build_random_model(tokenizer, vocab_size: int, hidden_size: int, num_layers: int, seed: int = 0):
    """A random-weight fp32 Qwen3 whose vocabulary is `vocab_size` (larger than the tokenizer's)."""
    from sd_plugin.testing import build_model

    return build_model("qwen3", tokenizer, seed=seed, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers)


class StepTimer:
    """Trainer callback recording the wall-clock time at the end of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                timer.marks.append(time.perf_counter())

        self.marks: list[float] = []
        self.callback = _Callback()

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


# ---------------------------------------------------------------------------------------------- workers
def make_trainer(spec: dict, tokenizer, *, hidden_size: int, num_layers: int, prompt_tokens: int,
                 demonstration_tokens: int, completion_tokens: int, steps: int, callbacks: list):
    """TRL's or our SDFTTrainer on a fresh random Qwen3, with the shared settings of this benchmark."""
    from datasets import Dataset
    from peft import LoraConfig

    # Rollouts per step: ours samples one per prompt (SDFT), so `rollouts` prompts; TRL samples `num_generations`
    # per prompt, so one prompt x `rollouts` generations. Both see `rollouts` completions per optimizer step.
    rollouts = spec.get("rollouts", 1)
    trl_rows, our_rows = make_records(tokenizer, steps * rollouts, prompt_tokens, demonstration_tokens, seed=spec["seed"])
    model = build_random_model(tokenizer, spec["vocab_size"], hidden_size, num_layers)
    lora_r = spec.get("lora_r", 64)
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    # gradient_checkpointing None: each trainer's own default (TRL's: on; ours, TrainingArguments': off).
    checkpointing = spec.get("gradient_checkpointing")
    common = dict(output_dir=tempfile.mkdtemp(prefix="bench_sdft_"), per_device_train_batch_size=rollouts, max_steps=steps,
                  learning_rate=1e-5, logging_steps=1000, report_to="none", save_strategy="no", use_cpu=True,
                  seed=0, max_completion_length=completion_tokens, num_loss_tokens_to_skip=spec.get("skip", SKIP_TOKENS),
                  distillation_alpha=spec.get("alpha", ALPHA), distillation_topk=TOPK if spec["mode"] == "topk" else None,
                  dataloader_num_workers=0, disable_tqdm=True,
                  **({} if checkpointing is None else {"gradient_checkpointing": checkpointing}))
    if spec["trainer"] == "trl":
        from trl.experimental.sdft import SDFTConfig as TRLConfig
        from trl.experimental.sdft import SDFTTrainer as TRLTrainer

        # trl_bf16 None: TRL's default, bf16=True, which on a CPU runs the forwards under bf16 autocast.
        precision = {} if spec.get("trl_bf16") is None else {"bf16": spec["trl_bf16"]}
        args = TRLConfig(**common, **precision, num_generations=rollouts, max_prompt_length=None, temperature=1.0,
                         top_p=1.0, distillation_mode="full_logits" if spec["mode"] == "full" else "topk_logits",
                         teacher_model_kind="base", shuffle_dataset=False,
                         generation_kwargs={"min_new_tokens": completion_tokens})
        return TRLTrainer(model=model, args=args, train_dataset=Dataset.from_list(trl_rows),
                          processing_class=tokenizer, peft_config=lora, callbacks=callbacks)
    # Our rollouts sample with an explicit GenerationConfig (the checkpoint's generation_config never reaches
    # them; top-k is off): give it min_new_tokens so that every rollout has exactly completion_tokens tokens.
    import sd_plugin.rollout as rollout_module
    from sd_plugin.trainers.sdft import SDFTConfig, SDFTTrainer

    plain = getattr(rollout_module.generation_config, "__wrapped__", rollout_module.generation_config)

    def exact_length_config(options, eos_token_ids, pad_token_id):
        config = plain(options, eos_token_ids, pad_token_id)
        config.min_new_tokens = completion_tokens
        return config

    exact_length_config.__wrapped__ = plain
    rollout_module.generation_config = exact_length_config
    args = SDFTConfig(**common, max_prompt_length=prompt_tokens,
                      max_teacher_prompt_length=max(len(r["teacher_input_ids"]) for r in our_rows),
                      temperature=1.0, top_p=1.0, distillation_mode=spec["mode"] + "_logits",
                      teacher_model_kind="base", loss_chunk_size=spec["loss_chunk_size"])
    return SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(our_rows),
                       processing_class=tokenizer, peft_config=lora, callbacks=callbacks)


def train_worker(spec: dict) -> dict:
    """One training run of one trainer (runs in its own subprocess); returns the measurements.

    A small pre-warm step (same trainer class, a 1-layer model, 16-token prompt, 4-token rollout) runs first so
    that lazy imports and thread start-up are not timed; `warmup` full-size steps are then run but not timed.
    """
    import gc

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if spec.get("prewarm", True):
        small = make_trainer(spec, tokenizer, hidden_size=64, num_layers=1, prompt_tokens=16, demonstration_tokens=8,
                             completion_tokens=4, steps=1, callbacks=[])
        small.train()
        del small
        gc.collect()
    timer, clock = StepTimer(), PhaseClock()
    trainer = make_trainer(spec, tokenizer, hidden_size=spec["hidden_size"], num_layers=spec["num_layers"],
                           prompt_tokens=spec["prompt_tokens"], demonstration_tokens=spec["demonstration_tokens"],
                           completion_tokens=spec["completion_tokens"], steps=spec["steps"] + spec["warmup"],
                           callbacks=[timer.callback, clock.callback()])
    time_phases(trainer, clock, spec["trainer"])
    peak_before_train = peak_rss_bytes()
    reset_peak_rss()  # so the training's own peak is measured exactly (the process peak is kept below)
    rss_before_train = current_rss_bytes()
    trainer.train()
    times = timer.step_times()
    measured = times[spec["warmup"]:]
    train_peak = peak_rss_bytes()
    return {
        "phases_s": clock.mean_phases(range(spec["warmup"] + 1, spec["warmup"] + spec["steps"] + 1)),
        "trainer": spec["trainer"], "mode": spec["mode"],
        "step_time_s": sum(measured) / len(measured), "step_times_s": times,
        "peak_rss": max(train_peak, peak_before_train), "rss_before_train": rss_before_train,
        "train_peak_rss": train_peak, "peak_before_train": peak_before_train,
        "bf16": bool(trainer.args.bf16), "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    }


def time_phases(trainer, clock, kind: str) -> None:
    """Wall-clock timers around each trainer's phases (bench_step_profile.PhaseClock): generation, teacher and
    student forward, loss, backward (the optimizer is timed by the clock's callback)."""
    import torch

    def forward_name(*args, **kwargs):
        return "student forward" if torch.is_grad_enabled() else "teacher forward"

    clock.wrap(trainer.accelerator, "backward", "backward")
    if kind == "trl":
        clock.wrap(trainer, "_generate", "rollout generation")
        clock.wrap(trainer, "_forward_logits", forward_name)  # with lm_head over the logits_to_keep slice
        clock.wrap(trainer, "_compute_self_distillation_loss", "loss forward")
        return
    import sd_plugin.trainers.base as base

    clock.wrap(trainer, "sample", "rollout generation")
    clock.wrap(base, "completion_hidden_states", forward_name)  # hidden states only: lm_head runs in the loss
    clock.wrap(base, "chunked_distillation_loss", "loss forward")


def loss_worker(spec: dict) -> dict:
    """Peak RSS of `chunked_distillation_loss` forward + backward at one completion length (own subprocess)."""
    import torch

    from sd_plugin.losses import DivergenceOptions, chunked_distillation_loss

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    tokens, hidden, vocab = spec["completion_tokens"], spec["hidden_size"], spec["vocab_size"]
    weight = torch.empty(vocab, hidden).normal_(0.0, 0.02)  # frozen lm_head (LoRA)
    student_hidden = torch.randn(1, tokens, hidden, requires_grad=True)
    teacher_hidden = torch.randn(1, tokens, hidden)
    mask = torch.ones(1, tokens, dtype=torch.long)
    sampled = torch.randint(0, vocab, (1, tokens))
    inputs_bytes = 3 * student_hidden.numel() * 4
    peak_before = peak_rss_bytes()
    reset_peak_rss()
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    options = DivergenceOptions(distillation_alpha=ALPHA, distillation_mode=spec["mode"] + "_logits",
                                distillation_topk=TOPK if spec["mode"] == "topk" else None)
    out = chunked_distillation_loss(student_hidden, teacher_hidden, weight, mask, options,
                                    loss_chunk_size=spec["loss_chunk_size"], sampled_ids=sampled,
                                    loss_reduction="sequence", num_loss_tokens_to_skip=SKIP_TOKENS)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(student_hidden.grad).all()
    return {"completion_tokens": tokens, "peak_rss": peak_rss_bytes(), "rss_before": rss_before,
            "peak_before": peak_before, "delta": peak_rss_bytes() - rss_before, "inputs_bytes": inputs_bytes,
            "time_s": elapsed}


# ---------------------------------------------------------------------------------------------- driver
# glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold on the heap, so RSS would also count
# memory that is free but not returned; a fixed 1 MiB threshold makes RSS track the live tensors.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def run_in_subprocess(kind: str, spec: dict, timeout_s: float, glibc_default: bool = False) -> dict:
    """Run `kind` (train / loss) with `spec` in a fresh Python process and parse its result line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not glibc_default:
        env.update(FIXED_MMAP_THRESHOLD)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"worker {kind} {spec} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")


def compare_trainers(args) -> list[dict]:
    """Alternating TRL / ours runs for every mode; returns one row per (mode, trainer) with the median run."""
    results = []
    for mode in args.modes:
        runs = {"trl": [], "ours": []}
        for round_index in range(args.rounds):
            order = ("trl", "ours") if round_index % 2 == 0 else ("ours", "trl")
            for trainer in order:
                spec = dict(trainer=trainer, mode=mode, steps=args.steps, warmup=args.warmup, threads=args.threads,
                            prompt_tokens=args.prompt_tokens, demonstration_tokens=args.demonstration_tokens,
                            completion_tokens=args.completion_tokens, vocab_size=args.vocab_size,
                            hidden_size=args.hidden_size, num_layers=args.num_layers,
                            loss_chunk_size=args.loss_chunk_size, seed=0, rollouts=args.rollouts, lora_r=args.lora_r,
                            alpha=args.alpha, skip=args.skip, gradient_checkpointing=args.gradient_checkpointing,
                            trl_bf16=args.trl_bf16)
                result = run_in_subprocess("train", spec, args.timeout, args.glibc_default)
                print(f"  {mode:5s} {trainer:5s} round {round_index}: step {result['step_time_s']:.2f} s, "
                      f"peak RSS {gib(result['peak_rss'])}, own {gib(result['train_peak_rss'] - result['rss_before_train'])}",
                      flush=True)
                runs[trainer].append(result)
        for trainer in ("trl", "ours"):
            chosen = sorted(runs[trainer], key=lambda r: r["step_time_s"])[len(runs[trainer]) // 2]
            peak = max(r["peak_rss"] for r in runs[trainer])
            results.append(dict(chosen, peak_rss=peak))
    return results


def print_trainer_table(results: list[dict], args) -> None:
    """The comparison table; "step's own peak" = peak RSS minus the RSS just before `trainer.train()`."""
    print()
    print(f"SDFT step, tiny random Qwen3 (hidden {args.hidden_size}, {args.num_layers} layers, V={args.vocab_size:,}), "
          f"LoRA r{args.lora_r}, base teacher, {args.rollouts} rollout(s) per step (ours: {args.rollouts} prompt(s) x 1, "
          f"TRL: 1 prompt x {args.rollouts}), alpha {args.alpha}, skip {args.skip}, prompt {args.prompt_tokens} / "
          f"completion {args.completion_tokens} tokens, {args.threads} CPU threads, our loss_chunk_size "
          f"{args.loss_chunk_size}, {args.steps} timed step(s) after a pre-warm and {args.warmup} full warm-up step(s); "
          f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| mode | trainer | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for row in results:
        print(f"| {row['mode']} | {row['trainer']} | " + " | ".join(f"{row['phases_s'].get(name, 0.0):.1f} s" for name in PHASES) + " |")
    for row in results:
        precision = "bf16 (on a CPU: bf16 autocast)" if row["bf16"] else "fp32"
        print(f"  {row['mode']} {row['trainer']}: {precision}, gradient checkpointing "
              f"{row['gradient_checkpointing']}, per-step times {', '.join(f'{t:.1f}' for t in row['step_times_s'])} s")
    print("| mode | trainer | step time | peak RSS | RSS before train | step's own peak | "
          "ours/TRL: step time | ours/TRL: peak RSS | ours/TRL: own peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["mode"], r["trainer"]): r for r in results}
    for mode in args.modes:
        trl, ours = by_key[(mode, "trl")], by_key[(mode, "ours")]
        for row in (trl, ours):
            ratios = " | | "
            if row is ours:
                own_ours = ours["train_peak_rss"] - ours["rss_before_train"]
                own_trl = trl["train_peak_rss"] - trl["rss_before_train"]
                ratios = (f"{ours['step_time_s'] / trl['step_time_s']:.2f}x | {ours['peak_rss'] / trl['peak_rss']:.2f}x | "
                          f"{own_ours / own_trl:.2f}x")
            own = row["train_peak_rss"] - row["rss_before_train"]
            label = f"top-K (K={TOPK})" if mode == "topk" else "full vocab"
            print(f"| {label} | {row['trainer']} | {row['step_time_s']:.1f} s | {gib(row['peak_rss'])} | "
                  f"{gib(row['rss_before_train'])} | {gib(own)} | {ratios} |")


def scaling(args) -> tuple[list[dict], list[dict]]:
    """Loss-only and full-step peak memory at several completion lengths."""
    loss_rows = []
    for tokens in args.scaling_lengths:
        spec = dict(completion_tokens=tokens, hidden_size=args.scaling_loss_hidden, vocab_size=args.scaling_loss_vocab,
                    loss_chunk_size=args.loss_chunk_size, mode="full", threads=args.threads)
        result = run_in_subprocess("loss", spec, args.timeout, args.glibc_default)
        print(f"  loss only, {tokens} tokens: peak delta {gib(result['delta'])} in {result['time_s']:.1f} s", flush=True)
        loss_rows.append(result)
    step_rows = []
    for tokens in args.scaling_lengths if args.scaling_steps else []:
        spec = dict(trainer="ours", mode="full", steps=1, warmup=0, threads=args.threads,
                    prompt_tokens=args.scaling_prompt_tokens, demonstration_tokens=64, completion_tokens=tokens,
                    vocab_size=args.scaling_step_vocab, hidden_size=64, num_layers=2,
                    loss_chunk_size=args.loss_chunk_size, seed=0)
        result = run_in_subprocess("train", spec, args.timeout, args.glibc_default)
        result["completion_tokens"] = tokens
        print(f"  training step, {tokens} tokens: peak RSS {gib(result['peak_rss'])}, own "
              f"{gib(result['train_peak_rss'] - result['rss_before_train'])}, {result['step_time_s']:.1f} s", flush=True)
        step_rows.append(result)
    return loss_rows, step_rows


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def print_scaling_table(loss_rows: list[dict], step_rows: list[dict], args) -> None:
    print()
    print(f"Scaling with completion length, loss_chunk_size {args.loss_chunk_size}, full vocab, reverse KL")
    print(f"loss only: chunked_distillation_loss fwd+bwd, H={args.scaling_loss_hidden}, V={args.scaling_loss_vocab:,}, "
          f"frozen lm_head; training step: OUR trainer on a SMALLER model (hidden 64, 2 layers, "
          f"V={args.scaling_step_vocab:,}, LoRA r64), prompt {args.scaling_prompt_tokens} tokens, rollout of exactly "
          f"N tokens")
    print("| completion tokens | loss: peak RSS growth | loss: of which d(loss)/d(hidden) [T, H] | loss time | "
          "step: peak RSS | step: own peak | step time |")
    print("|---|---|---|---|---|---|---|")
    steps = {r["completion_tokens"]: r for r in step_rows}
    for row in loss_rows:
        step = steps.get(row["completion_tokens"])
        step_cells = "| - | - | -"
        if step:
            step_cells = (f"| {gib(step['peak_rss'])} | {mib(step['train_peak_rss'] - step['rss_before_train'])} | "
                          f"{step['step_time_s']:.1f} s")
        gradient = row["completion_tokens"] * args.scaling_loss_hidden * 4
        print(f"| {row['completion_tokens']:,} | {mib(row['delta'])} | {mib(gradient)} | "
              f"{row['time_s']:.1f} s {step_cells} |")
    if len(loss_rows) >= 2:
        first, last = loss_rows[0], loss_rows[-1]
        growth = last["delta"] / first["delta"] - 1.0

        def without_gradient(row):
            return row["delta"] - row["completion_tokens"] * args.scaling_loss_hidden * 4

        working_growth = without_gradient(last) / without_gradient(first) - 1.0
        print(f"loss peak growth {first['completion_tokens']:,} -> {last['completion_tokens']:,} tokens: "
              f"{growth * 100:+.1f}% ({working_growth * 100:+.1f}% without the [T, H] gradient, which any loss "
              f"returns; at small V it dominates the growth)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 timed step, loss-only scaling at V=32,768 and no scaling training steps (~6 min)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per run, after the warm-up (3 for tighter numbers)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="full-size warm-up steps per run, not timed (a small pre-warm step always runs first)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating TRL/ours rounds per mode")
    parser.add_argument("--modes", default="full,topk", help="comma-separated: full, topk")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--demonstration-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=QWEN_VOCAB)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--loss-chunk-size", type=int, default=None, help="default: SDFTConfig's loss_chunk_size")
    parser.add_argument("--skip-trainers", action="store_true", help="only the scaling table")
    parser.add_argument("--skip-scaling", action="store_true", help="only the trainer comparison")
    parser.add_argument("--scaling-lengths", default="1024,4096,16384")
    parser.add_argument("--no-scaling-steps", dest="scaling_steps", action="store_false",
                        help="scaling table: the loss alone, no full training steps")
    parser.add_argument("--scaling-loss-vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--scaling-loss-hidden", type=int, default=256)
    parser.add_argument("--scaling-step-vocab", type=int, default=32768)
    parser.add_argument("--scaling-prompt-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    parser.add_argument("--glibc-default", action="store_true",
                        help="run workers with glibc's default malloc settings (RSS then also counts freed heap)")
    parser.add_argument("--rollouts", type=int, default=1,
                        help="rollouts per optimizer step: ours N prompts x 1 rollout, TRL 1 prompt x N generations")
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank (alpha = 2 r)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="distillation_alpha (0 forward KL, 1 reverse KL)")
    parser.add_argument("--skip", type=int, default=SKIP_TOKENS, help="num_loss_tokens_to_skip")
    parser.add_argument("--gradient-checkpointing", choices=("default", "on", "off"), default="default",
                        help="both trainers; default: each trainer's own (TRL: on, ours: off)")
    parser.add_argument("--trl-bf16", choices=("default", "on", "off"), default="default",
                        help="TRL's bf16 (default: TRL's, on, i.e. bf16 autocast on a CPU); ours always runs fp32")
    parser.add_argument("--setup", choices=("readme", "trl-user"), default="readme",
                        help="trl-user: TRL's SDFTConfig defaults where they apply (8 rollouts per step, top-K 100, "
                             "alpha 0.5, no skipped tokens, 512-token prompts, gradient checkpointing on in both), "
                             "LoRA r16, fp32 in both; readme: the flags as given")
    parser.add_argument("--json", help="also write all measurements to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 1, 0
        args.scaling_loss_vocab = 32768
        args.scaling_steps = False
    if args.setup == "trl-user":
        args.rollouts, args.lora_r, args.alpha, args.skip, args.prompt_tokens = 8, 16, 0.5, 0, 512
        args.gradient_checkpointing, args.trl_bf16, args.skip_scaling = "on", "off", True
    args.gradient_checkpointing = {"default": None, "on": True, "off": False}[args.gradient_checkpointing]
    args.trl_bf16 = {"default": None, "on": True, "off": False}[args.trl_bf16]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in ("full", "topk"):
            parser.error(f"unknown mode {mode!r}: use full and/or topk")
    args.scaling_lengths = [int(n) for n in str(args.scaling_lengths).split(",")]
    if args.loss_chunk_size is None:
        from sd_plugin.trainers.base import SelfDistillationOptions

        args.loss_chunk_size = SelfDistillationOptions.loss_chunk_size
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        kind, spec = argv[1], json.loads(argv[2])
        result = train_worker(spec) if kind == "train" else loss_worker(spec)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    args = parse_args(argv)
    started = time.perf_counter()
    trainer_results, loss_rows, step_rows = [], [], []
    if not args.skip_trainers:
        print("trainer runs (each in its own process):", flush=True)
        trainer_results = compare_trainers(args)
    if not args.skip_scaling:
        print("scaling runs:", flush=True)
        loss_rows, step_rows = scaling(args)
    if trainer_results:
        print_trainer_table(trainer_results, args)
    if loss_rows:
        print_scaling_table(loss_rows, step_rows, args)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"trainers": trainer_results, "loss_scaling": loss_rows, "step_scaling": step_rows,
                       "settings": {k: v for k, v in vars(args).items() if k != "json"}}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
