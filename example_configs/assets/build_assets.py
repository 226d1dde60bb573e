"""Rebuild the small files the quickstart, tests and notebooks use (run once; outputs are committed).

    python example_configs/assets/build_assets.py --shared ../shared

Writes, next to this script:
- data/*.jsonl: rows copied from ../shared/data/sdpo-benchmarks (Apache-2.0, lasgroup/SDPO, commit 0e6d510)
- tiny-qwen3/ and tiny-qwen3_5/: a byte-level BPE tokenizer trained on those rows and random-weight models
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sd_plugin.testing import build_model, build_tokenizer, read_jsonl

HERE = Path(__file__).resolve().parent


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def tooluse_demonstration(answer: str) -> str:
    steps = json.loads(answer)
    return "\n".join(f"Action: {step['Action']}\nAction Input: {step['Action_Input']}" for step in steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(HERE.parents[2] / "shared"))
    args = parser.parse_args()
    bench = Path(args.shared) / "data" / "sdpo-benchmarks"
    chem_train = read_jsonl(bench / "sciknoweval/chemistry/train.jsonl")
    chem_test = read_jsonl(bench / "sciknoweval/chemistry/test.jsonl")
    tooluse = read_jsonl(bench / "tooluse/test.jsonl")
    keep = ("idx", "prompt", "system", "answer")

    # Raw task rows (for verifiers, SDPO / SD-Zero examples and evaluation).
    write_jsonl(HERE / "data/chemistry_train.jsonl", [{k: r[k] for k in keep} for r in chem_train])
    write_jsonl(HERE / "data/chemistry_test.jsonl", [{k: r[k] for k in keep} for r in chem_test])
    write_jsonl(HERE / "data/tooluse_test.jsonl", [{k: r[k] for k in ("idx", "prompt", "answer")} for r in tooluse])

    # SDFT records: the tiny quickstart set (short chemistry questions) and the tool-use set.
    rng = random.Random(0)
    short = [r for r in chem_train if len(r["prompt"]) < 300]
    rng.shuffle(short)
    quick = [
        {
            "prompt": [{"role": "system", "content": r["system"].strip()}, {"role": "user", "content": r["prompt"]}],
            "demonstration": f"<reasoning>\nThe correct option is {r['answer']}.\n</reasoning>\n<answer>\n{r['answer']}\n</answer>",
            "answer": r["answer"],
        }
        for r in short[:64]
    ]
    write_jsonl(HERE / "data/quickstart_sdft.jsonl", quick)
    write_jsonl(
        HERE / "data/tooluse_sdft.jsonl",
        [{"prompt": r["prompt"], "demonstration": tooluse_demonstration(r["answer"]), "answer": r["answer"]} for r in tooluse],
    )

    texts = [r["prompt"] + "\n" + r["system"] for r in chem_train[:800]] + [r["prompt"] for r in tooluse]
    texts += [json.dumps(r["prompt"]) + tooluse_demonstration(r["answer"]) for r in tooluse]
    tokenizer = build_tokenizer(texts, vocab_size=1024)
    for kind in ("qwen3", "qwen3_5"):
        out = HERE / f"tiny-{kind}"
        model = build_model(kind, tokenizer)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        print(f"wrote {out} ({sum(p.numel() for p in model.parameters())} parameters)")


if __name__ == "__main__":
    main()
