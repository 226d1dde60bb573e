"""Benchmark: where one SDFT step and one SDPO step spend their time on the demo model (SmolLM2-135M, CPU).

Wall-clock timers around the trainer's phases, one table per method:
  - rollout generation   `SelfDistillationTrainer.sample` (transformers' generate, sampling)
  - teacher forward      `completion_hidden_states` under no_grad (the teacher's hidden states at y)
  - student forward      `completion_hidden_states` with grad (the student's hidden states at y)
  - loss forward         `chunked_distillation_loss` (lm_head per chunk, divergence, closed-form logit gradient)
  - backward             `accelerator.backward` (the student's backward, through the loss's saved chunks)
  - optimizer            `optimizer.step` (AdamW on the LoRA weights)
  - other                the rest of the step (collation, verifier, teacher update, metrics, callbacks)
and, outside the steps, the held-out evaluation (`GenerationEvaluation.evaluate`: greedy answers to both
prompt sets, verified), which runs at step 0 and at the end.

SDFT runs the quickstart's settings (example_configs/quickstart.yml: batch 4, LoRA r8 on every projection,
32-token rollouts, base-model teacher with the JSON template, forward KL, the contact-card rows, both
evaluation sets); SDPO runs benchmarks/bench_sdpo_demo.py's (4 capital questions x 4 rollouts of 24 tokens,
base-model teacher, the paper's reprompt). The first step is a warm-up (lazy imports, allocator), so the table
shows each phase per step over the steps after it, and step 1 separately.

    python -m sd_plugin.cli demo-model --out outputs/SmolLM2-135M-Instruct     # once
    python benchmarks/bench_step_profile.py                    # SDFT and SDPO, 3 steps each
    python benchmarks/bench_step_profile.py --methods sdft --steps 2 --no-eval
    python benchmarks/bench_step_profile.py --methods sdft,trl-sdft --no-eval   # ours and TRL's SDFTTrainer, same rows
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "example_configs" / "assets" / "data"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
JSON_TEMPLATE = "{question}\n\nAnswer with one line of JSON exactly like this:\n{demonstration}"  # quickstart.yml
PHASES = ("rollout generation", "teacher forward", "student forward", "loss forward", "backward", "optimizer", "other")


class PhaseClock:
    """Seconds per phase per optimizer step (step 0 = the evaluation before training)."""

    def __init__(self):
        self.step = 0
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.step_total: dict[int, float] = {}
        self.evaluation: list[float] = []
        self._step_start = None

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[self.step][name] += time.perf_counter() - start

    def wrap(self, owner, attribute: str, name):
        """Replace owner.attribute by a timed call; `name` is a phase name or a function of the call's arguments."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(name(*args, **kwargs) if callable(name) else name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def mean_phases(self, steps) -> dict[str, float]:
        """Seconds per phase averaged over `steps`, with "other" = the step's time not in any timed phase."""
        steps = [s for s in steps if s in self.step_total]
        means = {}
        for step in steps:
            measured = dict(self.seconds[step])
            measured["other"] = self.step_total[step] - sum(v for k, v in measured.items() if k != "other")
            for name, value in measured.items():
                means[name] = means.get(name, 0.0) + value / len(steps)
        return means

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Steps(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
                clock.wrap(optimizer, "step", "optimizer")

            def on_step_begin(self, args, state, control, **kwargs):
                clock.step = state.global_step + 1
                clock._step_start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock.step_total[clock.step] = time.perf_counter() - clock._step_start
                # One line per step as it ends, so that a run cut short still reports its finished steps.
                phases = clock.mean_phases([clock.step])
                print(f"step {clock.step}: {clock.step_total[clock.step]:.2f} s; "
                      + ", ".join(f"{name} {phases.get(name, 0.0):.2f} s" for name in PHASES), flush=True)

        return _Steps()


def build_trainer(method: str, model_dir: str, steps: int, evaluation: bool):
    """Our SDFT or SDPO trainer, or TRL's SDFTTrainer (`trl-sdft`), on the demo model with the shared settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin.testing import read_jsonl

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    common = dict(output_dir=tempfile.mkdtemp(prefix="bench_step_profile_"), max_steps=steps,
                  per_device_train_batch_size=4, learning_rate=1e-3, lr_scheduler_type="constant_with_warmup",
                  warmup_steps=2, weight_decay=0.0, max_grad_norm=1.0, seed=42, logging_steps=1, save_strategy="no",
                  report_to="none", use_cpu=True, disable_tqdm=True, temperature=1.0, teacher_model_kind="base")
    contact = dict(max_prompt_length=256, max_completion_length=32, distillation_alpha=0.0, num_loss_tokens_to_skip=0)
    if method == "trl-sdft":
        # TRL at the quickstart's settings: 4 prompts x 1 rollout, the same template under TRL's placeholder names,
        # forward KL on full logits, fp32 and no gradient checkpointing like ours (TRL's CPU defaults are bf16
        # autocast and checkpointing). TRL has no held-out evaluation.
        from trl.experimental.sdft import SDFTConfig as TRLConfig
        from trl.experimental.sdft import SDFTTrainer as TRLTrainer

        records = [{"prompt": row["prompt"], "privileged_context": row["demonstration"]}
                   for row in read_jsonl(DATA / "contact_train.jsonl")]
        template = JSON_TEMPLATE.replace("{question}", "{prompt}").replace("{demonstration}", "{privileged_context}")
        args = TRLConfig(**common, **contact, num_generations=1, bf16=False, gradient_checkpointing=False, top_p=1.0,
                         distillation_mode="full_logits", teacher_prompt_template=template)
        return TRLTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                          peft_config=lora)
    if method == "sdft":  # example_configs/quickstart.yml
        from sd_plugin import SDFTConfig, SDFTTrainer

        records = [{k: v for k, v in row.items() if k != "answer"} for row in read_jsonl(DATA / "contact_train.jsonl")]
        evaluation_options = dict(eval_prompts=str(DATA / "contact_test.jsonl"),
                                  eval_verifier="sd_plugin.demo_task:ContactCardVerifier",
                                  prior_prompts=str(DATA / "capitals_test.jsonl"),
                                  prior_verifier="sd_plugin.demo_task:AnswerContainsVerifier", eval_max_new_tokens=32)
        args = SDFTConfig(**common, **contact, teacher_template=JSON_TEMPLATE, max_teacher_prompt_length=384,
                          **(evaluation_options if evaluation else {}))
        return SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                           peft_config=lora)
    from sd_plugin import SDPOConfig, SDPOTrainer  # benchmarks/bench_sdpo_demo.py with a base-model teacher

    records = read_jsonl(DATA / "capitals_test.jsonl")
    args = SDPOConfig(**common, num_generations=4, max_completion_length=24, max_prompt_length=128,
                      verifier="sd_plugin.demo_task:AnswerContainsVerifier")
    return SDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                       peft_config=lora)


def profile_trl(model_dir: str, steps: int) -> PhaseClock:
    import torch

    clock = PhaseClock()
    trainer = build_trainer("trl-sdft", model_dir, steps, evaluation=False)
    clock.wrap(trainer, "_generate", "rollout generation")
    clock.wrap(trainer, "_forward_logits", lambda *a, **k: "student forward" if torch.is_grad_enabled() else "teacher forward")
    clock.wrap(trainer, "_compute_self_distillation_loss", "loss forward")
    clock.wrap(trainer.accelerator, "backward", "backward")
    trainer.add_callback(clock.callback())
    trainer.train()
    return clock


def profile(method: str, model_dir: str, steps: int, evaluation: bool) -> PhaseClock:
    import torch

    import sd_plugin.trainers.base as base
    from sd_plugin.evaluation import GenerationEvaluation

    if method == "trl-sdft":
        return profile_trl(model_dir, steps)
    clock = PhaseClock()
    saved = {name: getattr(base, name) for name in ("completion_hidden_states", "chunked_distillation_loss")}
    trainer = build_trainer(method, model_dir, steps, evaluation)
    clock.wrap(trainer, "sample", "rollout generation")
    clock.wrap(base, "completion_hidden_states",
               lambda *a, **k: "student forward" if torch.is_grad_enabled() else "teacher forward")
    clock.wrap(base, "chunked_distillation_loss", "loss forward")
    clock.wrap(trainer.accelerator, "backward", "backward")
    original_evaluate = GenerationEvaluation.evaluate

    def timed_evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original_evaluate(self, *args, **kwargs)
        finally:
            clock.evaluation.append(time.perf_counter() - start)

    GenerationEvaluation.evaluate = timed_evaluate
    trainer.add_callback(clock.callback())
    try:
        trainer.train()
    finally:
        GenerationEvaluation.evaluate = original_evaluate
        for name, function in saved.items():
            setattr(base, name, function)
    return clock


def print_table(method: str, clock: PhaseClock) -> None:
    steps = sorted(clock.step_total)
    later = steps[1:] or steps
    first_phases, later_phases = clock.mean_phases(steps[:1]), clock.mean_phases(later)
    load = os.getloadavg()
    print(f"\n{method.upper()}: seconds per phase; step 1 (warm-up) and the mean of steps {later[0]}-{later[-1]}; "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, {os.environ.get('OMP_NUM_THREADS', 'default')} "
          f"OMP threads, torch threads {__import__('torch').get_num_threads()}")
    print("| phase | step 1 | later steps (mean) | share of a later step |")
    print("|---|---|---|---|")
    total = sum(clock.step_total[s] for s in later) / len(later)
    for name in PHASES:
        first, mean = first_phases.get(name, 0.0), later_phases.get(name, 0.0)
        print(f"| {name} | {first:.2f} s | {mean:.2f} s | {100 * mean / total:.0f}% |")
    print(f"| **step** | {clock.step_total[steps[0]]:.2f} s | {total:.2f} s | 100% |")
    if clock.evaluation:
        print(f"| evaluation (each; not in the step) | {' / '.join(f'{s:.2f} s' for s in clock.evaluation)} | | |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "outputs" / "SmolLM2-135M-Instruct"), help="sd-plugin demo-model output")
    parser.add_argument("--methods", default="sdft,sdpo", help="sdft, sdpo, trl-sdft (TRL's SDFTTrainer, quickstart rows)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per method (the first is a warm-up)")
    parser.add_argument("--no-eval", dest="evaluation", action="store_false", help="SDFT without the held-out evaluation")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in ("sdft", "sdpo", "trl-sdft"):
            parser.error(f"unknown method {method!r}: use sdft, sdpo and/or trl-sdft")
        start = time.perf_counter()
        clock = profile(method, args.model, args.steps, args.evaluation)
        print_table(method, clock)
        print(f"{method}: {time.perf_counter() - start:.0f} s in all (model load, {args.steps} steps, evaluation)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
