"""Iterated self-distillation end to end on a real model: generate, measure, mix, train round 2, evaluate.

The task: a prompt names a category ("Name one fruit. Reply with just the name.", after one worked example)
and the model has to pick an item; the catalog is the 144 items of 6 categories (CATALOG below). The reward (`catalog_reward`, used as
`--verifier benchmarks.bench_iterated:catalog_reward`) is 1.0 for an answer that is exactly one catalog item
of the asked category in at most 4 words, 0.5 when such an item is named in a longer answer, 0 otherwise. The
group of a sample (its "template") is the catalog item it picked, so `sd-plugin stats` measures how much of
the catalog a corpus covers.

The loop, each step printed as the command it runs (`sd-plugin ...` commands run in this process):
  1. base corpus: `sd-plugin generate` from the base model on the training prompts at temperature T;
     samples with reward >= --min-reward are kept (rejection sampling);
  2. round 1: SFT on the kept base samples (SDFTTrainer with lambda_on_policy=0: every row is cross-entropy
     on its demonstration, no rollout, no teacher), LoRA;
  3. round-2 corpora from the round-1 model at T and at a higher temperature;
  4. `sd-plugin stats` of base / r1@T / r1@hot: coverage, entropy, top-10 share, plus a rank plot;
  5. `sd-plugin mix` of the base corpus and the hot round-2 corpus (group cap, half from round 1);
  6. round 2 from the base model with the round-1 recipe, on the naive corpus (r1@T) and on the mixed one;
  7. every stage (base, r1, r2-naive, r2-mixed) answers held-out prompt phrasings; `sd-plugin eval-stats`
     (mean reward, pass rate, bootstrap intervals) and `sd-plugin stats` (coverage) compare them.

Resumable: generation resumes through `sd-plugin generate`'s log, trained adapters are kept, and the cheap
statistics are recomputed. Everything lands in --out (default outputs/bench_iterated); `results.json`
collects the numbers.

    python benchmarks/bench_iterated.py                 # SmolLM2-135M-Instruct (sd-plugin demo-model), 1 thread
    python benchmarks/bench_iterated.py --smoke --out /tmp/smoke    # the tiny random model, ~1 min (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the verifier is imported as benchmarks.bench_iterated:catalog_reward
    sys.path.insert(0, str(REPO))

CATALOG = {
    "fruit": ["apple", "banana", "orange", "mango", "strawberry", "grape", "pineapple", "peach", "pear", "cherry",
              "watermelon", "kiwi", "lemon", "plum", "blueberry", "papaya", "apricot", "coconut", "lime",
              "raspberry", "pomegranate", "fig", "guava", "avocado"],
    "animal": ["dog", "cat", "elephant", "lion", "tiger", "giraffe", "zebra", "monkey", "horse", "cow", "rabbit",
               "bear", "wolf", "fox", "dolphin", "whale", "eagle", "owl", "penguin", "kangaroo", "panda", "deer",
               "snake", "turtle"],
    "country": ["France", "Japan", "Brazil", "Canada", "India", "China", "Germany", "Italy", "Spain", "Mexico",
                "Australia", "Egypt", "Kenya", "Russia", "Argentina", "Norway", "Sweden", "Greece", "Peru",
                "Nigeria", "Thailand", "Turkey", "Chile", "Portugal"],
    "musical instrument": ["piano", "guitar", "violin", "drums", "flute", "trumpet", "saxophone", "cello", "harp",
                           "clarinet", "ukulele", "banjo", "trombone", "accordion", "harmonica", "oboe", "tuba",
                           "xylophone", "mandolin", "organ", "bagpipes", "sitar", "tambourine", "bass"],
    "vegetable": ["carrot", "broccoli", "potato", "tomato", "spinach", "onion", "cucumber", "lettuce", "pepper",
                  "cabbage", "corn", "peas", "celery", "garlic", "eggplant", "zucchini", "kale", "cauliflower",
                  "beet", "radish", "pumpkin", "asparagus", "mushroom", "squash"],
    "sport": ["soccer", "basketball", "tennis", "baseball", "cricket", "golf", "swimming", "volleyball", "hockey",
              "rugby", "boxing", "cycling", "running", "skiing", "surfing", "badminton", "wrestling", "gymnastics",
              "fencing", "rowing", "archery", "karate", "skateboarding", "football"],
}
CATALOG_SIZE = sum(len(items) for items in CATALOG.values())
# One worked example before the question: without it the 135M model rarely answers with just a name.
ONE_SHOT = [{"role": "user", "content": "Name one color. Reply with just the name."},
            {"role": "assistant", "content": "Blue"}]
TRAIN_PHRASINGS = [
    "Name one {c}. Reply with just the name.",
    "Give me an example of a {c}. Answer in one or two words.",
    "What is a {c} you can think of? Just say its name.",
]
EVAL_PHRASINGS = [  # held out: never seen in training
    "Suggest any {c}. Only the name, please.",
    "Which {c} comes to mind first? Answer with its name only.",
]
STAGES = ["base", "r1", "r2-naive", "r2-mixed"]


def _pattern(item: str) -> re.Pattern:
    plural = "" if item.endswith("s") else "(?:e?s)?"
    return re.compile(rf"\b{re.escape(item.lower())}{plural}\b")


PATTERNS = {category: [(item, _pattern(item)) for item in items] for category, items in CATALOG.items()}


def catalog_choice(completion: str, category: str) -> tuple[str | None, int]:
    """The catalog item of `category` named first in the completion, and how many distinct items it names."""
    text = completion.lower()
    found = sorted((match.start(), item) for item, pattern in PATTERNS[category] if (match := pattern.search(text)))
    return (found[0][1] if found else None), len(found)


def catalog_reward(prompt, completion, record):
    """Verifier: 1.0 = exactly one item of the asked category in <= 4 words, 0.5 = named in a longer answer."""
    category = record["category"]
    item, count = catalog_choice(completion, category)
    if item is None:
        return 0.0, f"names no {category} of the catalog"
    if count == 1 and len(completion.split()) <= 4:
        return 1.0, None
    return 0.5, f"{item}: name exactly one {category}, in at most 4 words"


@dataclass
class Settings:
    model: str
    temperature: float = 0.8        # round-1 sampling, naive round 2 and evaluation
    hot_temperature: float = 1.2    # the "higher temperature" round-2 corpus
    num_samples: int = 8            # per training prompt
    eval_samples: int = 4           # per held-out prompt and stage
    max_new_tokens: int = 12
    min_reward: float = 1.0         # rejection sampling: kept samples
    train_steps: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    lora_r: int = 16
    group_cap: int = 4              # mixer: rows per catalog item
    mix_in_ratio: float = 0.5
    generate_batch: int = 8         # prompts per generate call
    seed: int = 0


def smoke_settings() -> Settings:
    return Settings(model=str(REPO / "example_configs" / "assets" / "tiny-qwen3"), num_samples=2, eval_samples=2,
                    max_new_tokens=4, min_reward=0.0, train_steps=2, batch_size=4, lora_r=4)


def write_jsonl(path: Path, rows) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(temporary, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_rows(phrasings: list[str], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}-{category.replace(' ', '_')}-{k}", "category": category, "prompt": ONE_SHOT + [{"role": "user", "content": phrasing.format(c=category)}]}
            for category in CATALOG for k, phrasing in enumerate(phrasings)]


def sd_plugin(*argv: str) -> None:
    """Run one `sd-plugin` command in this process, printed first as it would be typed."""
    from sd_plugin.cli import main

    print(f"\n$ sd-plugin {shlex.join(argv)}", flush=True)
    status = main(list(argv))
    if status:
        raise SystemExit(f"sd-plugin {argv[0]} failed with exit status {status}")


def annotate(corpus: Path, min_reward: float | None = None, **extra) -> Path:
    """Add each sample's catalog choice as `template_id` ("category:item", or "none") and `valid`; with
    `min_reward`, keep only the samples that reach it (rejection sampling). Writes CORPUS.kept / .scored."""
    rows = []
    for row in read_jsonl(corpus):
        item, _ = catalog_choice(row["completion"], row["category"])
        row = {**row, "template_id": f"{row['category']}:{item}" if item else "none", "valid": item is not None, **extra}
        if min_reward is None or row["reward"] >= min_reward:
            rows.append(row)
    out = corpus.with_suffix(".kept.jsonl" if min_reward is not None else ".scored.jsonl")
    write_jsonl(out, rows)
    return out


def rarefied_coverage(corpora: dict[str, Path], draws: int = 1000, seed: int = 0) -> dict:
    """Unique groups and top-10 share of each corpus in random subsamples of the smallest corpus's size: a
    corpus with more rows covers more groups by chance alone, so coverage is compared at equal size."""
    import numpy as np

    groups = {name: [row["template_id"] for row in read_jsonl(path)] for name, path in corpora.items()}
    size = min(len(g) for g in groups.values())
    rng = np.random.default_rng(seed)
    result = {}
    for name, labels in groups.items():
        unique, top10 = [], []
        for _ in range(draws if size else 0):
            sample = [labels[i] for i in rng.choice(len(labels), size, replace=False)]
            counts = sorted(Counter(sample).values(), reverse=True)
            unique.append(len(counts))
            top10.append(sum(counts[:10]) / size)
        result[name] = {"rows": size, "unique_groups": float(np.mean(unique)) if unique else 0.0,
                        "unique_groups_95": [float(np.percentile(unique, 2.5)), float(np.percentile(unique, 97.5))]
                        if unique else None, "top10_share": float(np.mean(top10)) if top10 else None}
    return result


def generate(s: Settings, prompts: Path, output: Path, round_label: str, temperature: float, num_samples: int,
             adapter: Path | None = None) -> Path:
    argv = ["generate", "--model", s.model, "--prompts", str(prompts), "--output", str(output),
            "--num-samples", str(num_samples), "--temperature", str(temperature), "--top-p", "1.0",
            "--max-new-tokens", str(s.max_new_tokens), "--seed", str(s.seed), "--batch-size", str(s.generate_batch),
            "--verifier", "benchmarks.bench_iterated:catalog_reward", "--round", round_label, "--group-column", "category",
            "--dtype", "float32"]
    if adapter is not None:
        argv[5:5] = ["--adapter", str(adapter)]
    sd_plugin(*argv)
    return output


def train_sft(s: Settings, corpus: Path, adapter_dir: Path) -> dict:
    """SFT with the SDFT trainer (lambda_on_policy=0: cross-entropy on each row's demonstration), LoRA."""
    summary_path = adapter_dir / "bench_train.json"
    if summary_path.exists():
        print(f"\n# {adapter_dir}: trained in an earlier run, kept", flush=True)
        return json.loads(summary_path.read_text())
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin import SDFTConfig, SDFTTrainer

    records = [{"prompt": row["prompt"], "demonstration": row["completion"]} for row in read_jsonl(corpus)
               if row["completion"].strip()]
    print(f"\n# SFT {adapter_dir.name}: {len(records)} rows of {corpus.name}, {s.train_steps} steps x {s.batch_size}, "
          f"lr {s.learning_rate}, LoRA r{s.lora_r} (SDFTTrainer, lambda_on_policy=0)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    model = AutoModelForCausalLM.from_pretrained(s.model, dtype=torch.float32)
    args = SDFTConfig(
        output_dir=str(adapter_dir), max_steps=s.train_steps, per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate, lr_scheduler_type="constant", warmup_steps=0, lambda_on_policy=0.0,
        num_loss_tokens_to_skip=0, max_completion_length=s.max_new_tokens, logging_steps=1, save_strategy="no",
        report_to="none", seed=s.seed, data_seed=s.seed, disable_tqdm=True,
    )
    lora = LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                          peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    losses = [entry["ce_loss"] for entry in trainer.state.log_history if "ce_loss" in entry]
    summary = {"rows": len(records), "steps": s.train_steps, "first_ce_loss": losses[0] if losses else None,
               "last_ce_loss": losses[-1] if losses else None, "seconds": time.perf_counter() - started}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"# trained {adapter_dir.name}: ce_loss {summary['first_ce_loss']} -> {summary['last_ce_loss']} "
          f"in {summary['seconds']:.0f} s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench_iterated")
    parser.add_argument("--model", default=None, help="default: the demo model (built by sd-plugin demo-model if absent)")
    parser.add_argument("--smoke", action="store_true", help="the tiny random model, tiny settings (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    s = smoke_settings() if args.smoke else Settings(model=args.model or "outputs/SmolLM2-135M-Instruct")
    if args.model:
        s.model = args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not args.model and not (Path(s.model) / "demo_model.json").exists():
        sd_plugin("demo-model", "--out", s.model)
    started = time.perf_counter()
    timings = {}

    def timed(name, function, *a, **k):
        begin = time.perf_counter()
        result = function(*a, **k)
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - begin, 1)
        return result

    train_prompts, eval_prompts = out / "train_prompts.jsonl", out / "eval_prompts.jsonl"
    write_jsonl(train_prompts, prompt_rows(TRAIN_PHRASINGS, "train"))
    write_jsonl(eval_prompts, prompt_rows(EVAL_PHRASINGS, "eval"))
    hot = s.hot_temperature

    # 1-2. Round 1: rejection-sampled base corpus, SFT on it.
    base = timed("generate", generate, s, train_prompts, out / "corpus_base_T.jsonl", "base", s.temperature, s.num_samples)
    base_kept = annotate(base, s.min_reward)
    r1 = out / "adapter_r1"
    train = {"r1": timed("train", train_sft, s, base_kept, r1)}

    # 3. Round-2 corpora from the round-1 model, at T and at the higher temperature.
    r1_t = timed("generate", generate, s, train_prompts, out / "corpus_r1_T.jsonl", "r1", s.temperature, s.num_samples, r1)
    r1_hot = timed("generate", generate, s, train_prompts, out / "corpus_r1_hot.jsonl", "r1", hot, s.num_samples, r1)
    r1_t_kept, r1_hot_kept = annotate(r1_t, s.min_reward), annotate(r1_hot, s.min_reward)

    # 4. Coverage of the catalog: does the round-2 corpus collapse?
    sd_plugin("stats", str(base_kept), str(r1_t_kept), str(r1_hot_kept), "--catalog-size", str(CATALOG_SIZE),
              "--json", str(out / "corpus_stats.json"), "--plot", str(out / "coverage.png"))

    rarefied = rarefied_coverage({p.name: p for p in (base_kept, r1_t_kept, r1_hot_kept)}, seed=s.seed)
    print(f"\n# coverage at equal size ({next(iter(rarefied.values()))['rows']} rows drawn without replacement, "
          "1000 draws: mean unique groups [95% range], mean top-10 share)")
    for name, value in rarefied.items():
        interval = value["unique_groups_95"] or [0, 0]
        print(f"#   {name:28s} {value['unique_groups']:6.1f} [{interval[0]:.0f}, {interval[1]:.0f}]  "
              f"{value['top10_share'] or 0:.3f}")

    # 5. The diversity-preserving round-2 corpus: round 1 mixed in, every catalog item capped.
    mixed = out / "corpus_r2_mixed.jsonl"
    size = max(1, len(read_jsonl(r1_t_kept)))
    sd_plugin("mix", str(base_kept), str(r1_hot_kept), "--out", str(mixed), "--size", str(size), "--seed", str(s.seed),
              "--mix-in-ratio", str(s.mix_in_ratio), "--group-cap", str(s.group_cap), "--no-dedup",
              "--catalog-size", str(CATALOG_SIZE), "--summary", str(out / "mix_summary.json"))

    # 6. Round 2 from the base model with the round-1 recipe: naive corpus vs mixed corpus.
    train["r2-naive"] = timed("train", train_sft, s, r1_t_kept, out / "adapter_r2_naive")
    train["r2-mixed"] = timed("train", train_sft, s, mixed, out / "adapter_r2_mixed")

    # 7. Held-out evaluation of every stage.
    adapters = {"base": None, "r1": r1, "r2-naive": out / "adapter_r2_naive", "r2-mixed": out / "adapter_r2_mixed"}
    scored = []
    for stage, adapter in adapters.items():
        path = timed("generate", generate, s, eval_prompts, out / f"eval_{stage}.jsonl", stage, s.temperature,
                     s.eval_samples, adapter)
        # The task has no good/bad scenarios: every held-out prompt is "good" and the AUC row stays empty.
        scored.append(annotate(path, None, stage=stage, label="good"))
        rows = read_jsonl(scored[-1])
        for row in rows:
            row["scenario_id"] = row["prompt_id"]
        write_jsonl(scored[-1], rows)
    sd_plugin("eval-stats", *map(str, scored), "--stage-names", ",".join(STAGES), "--pass-field", "valid",
              "--bootstrap", "1000", "--seed", str(s.seed), "--json", str(out / "eval_stats.json"))
    eval_valid = []
    for stage, path in zip(STAGES, scored):
        valid = [row for row in read_jsonl(path) if row["valid"]]
        eval_valid.append(out / f"eval_{stage}.valid.jsonl")
        write_jsonl(eval_valid[-1], valid)
    sd_plugin("stats", *map(str, eval_valid), "--catalog-size", str(CATALOG_SIZE),
              "--json", str(out / "eval_coverage.json"), "--plot", str(out / "eval_coverage.png"))

    corpus_stats = json.loads((out / "corpus_stats.json").read_text())["corpora"]
    results = {
        "settings": asdict(s), "catalog_size": CATALOG_SIZE, "train": train, "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
        "corpora": {c["name"]: {k: c[k] for k in ("n", "reward_mean", "unique_groups", "coverage", "group_entropy",
                                                 "effective_groups", "top10_share")} for c in corpus_stats},
        "coverage_at_equal_size": rarefied,
        "raw_samples": {p.name: len(read_jsonl(p)) for p in (base, r1_t, r1_hot)},
        "mix": json.loads((out / "mix_summary.json").read_text()).get("counts"),
        "eval": json.loads((out / "eval_stats.json").read_text())["stages"],
        "eval_coverage": {c["name"]: {k: c[k] for k in ("n", "unique_groups", "group_entropy", "top10_share")}
                          for c in json.loads((out / "eval_coverage.json").read_text())["corpora"]},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n# done in {results['total_s']:.0f} s (this run; steps kept from earlier runs not counted): {timings}")
    print(f"# results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
