"""SD-Zero phase 1 data: sample, verify, revise, verify again, keep the verified-correct revisions.

    sd-plugin collect-revisions --model PATH --problems problems.jsonl --verifier multiple_choice \\
        --output data/revisions.jsonl

For each problem x (a prompt row: {"prompt": str | messages, "system"?, "tools"?, task fields such as "answer"}):

1. sample y_init from chat(x) and verify it (reward >= success_reward_threshold: correct);
2. prefill the assistant turn with y_init + separator + P_r + separator, where P_r is the control phrase for
   that outcome ("Let me rephrase the above solution." / "Wait, this response is wrong. Let me correct it."
   for Qwen; per model family or overridden), and sample `num_revisions` revisions;
3. keep the revisions the verifier accepts.

The output holds one row per kept revision: the problem's own columns plus `source_row`, `y_init`,
`initially_correct`, `control_phrase` and `y_revised`, the input of `sdzero.phase: srt`.

Resumable: each finished batch of problems is appended to OUTPUT.attempts.jsonl (one line per problem,
flushed and synced); a rerun skips the problems already there (a line cut off by a crash is dropped) and
writes OUTPUT from that log, so a crash never duplicates or loses finished rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sd_plugin.cli import UsageError, argument_parser
from sd_plugin.contexts import control_phrases, sdzero_delimiter_ids, sdzero_teacher_ids
from sd_plugin.data import Columns, RecordError, end_of_turn_ids, prompt_record
from sd_plugin.deprecated import accepts_deprecated_names, resolve_deprecated_flag
from sd_plugin.files import (
    append_attempts,
    attempts_path,
    check_model_source,
    json_object,
    read_attempts,
    read_jsonl_rows,
    refuse_output_over_input,
    write_text_atomic,
)
from sd_plugin.option_checks import check_option_types, check_reward_threshold
from sd_plugin.rollout import SamplingOptions, generate_rollouts
from sd_plugin.rows import PromptRow, left_pad, prepare_prompt_rows
from sd_plugin.verifiers import load_verifier, verify_completion


@dataclass
class SDZeroSharedOptions:
    """The options of SD-Zero's data collection (`RevisionOptions`) that its training (`SDZeroOptions`) has too.

    How a response is judged and how the revision prompt is phrased: the SRT data and the distill phase's teacher
    inputs must agree on them, so both classes inherit these fields from here.
    """

    verifier: str | None = field(default=None, metadata={"help": "Required (collect-revisions, phase: distill): multiple_choice | tool_calls | boxed_math | python_tests | package.module:callable; in Python also a callable (prompt, completion, record) -> (reward, feedback)."})
    verifier_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Keyword arguments of the verifier (e.g. answer_field)."})
    success_reward_threshold: float = field(default=1.0, metadata={"help": "A response with reward >= this is correct (control phrase for correct responses)."})
    control_phrase_family: str = field(default="qwen", metadata={"help": "Control phrases of this model family: qwen | olmo (official code)."})
    control_phrase_correct: str | None = field(default=None, metadata={"help": "Override of the phrase after a correct response (must match the SRT data)."})
    control_phrase_incorrect: str | None = field(default=None, metadata={"help": "Override of the phrase after an incorrect response (must match the SRT data)."})
    separator: str = field(default="\n\n", metadata={"help": "Text around the control phrase: y + separator + P_r + separator (must match the SRT data)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompt (string or messages)."})
    tools_column: str = field(default="tools", metadata={"help": "Column with tool schemas (optional)."})


@accepts_deprecated_names
@dataclass
class RevisionOptions(SDZeroSharedOptions):
    """How `collect_revisions` samples and judges (defaults: the official SD-Zero collection script)."""

    num_revisions: int = 1
    revise_correct: bool = True  # the paper revises both outcomes; False revises incorrect y_init only
    max_new_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    max_prompt_length: int = 4096
    max_kept: int | None = None  # stop once this many revisions are kept (the official script: 6000)
    seed: int = 0

    def check(self) -> None:
        check_option_types(self)
        if self.verifier is None:
            raise ValueError("verifier is required: a built-in name (multiple_choice, tool_calls, boxed_math, python_tests), "
                             "'package.module:callable' or a callable")
        check_reward_threshold(self.success_reward_threshold)
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        for key in ("num_revisions", "max_new_tokens", "batch_size", "max_prompt_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_kept is not None and self.max_kept < 1:
            raise ValueError(f"max_kept must be >= 1 (or unset), got {self.max_kept}")
        control_phrases(self.control_phrase_family, self.control_phrase_correct, self.control_phrase_incorrect)


@dataclass
class CollectionSummary:
    """Counts over every problem in the attempts log (this run and the runs it resumes)."""

    attempted: int          # problems with a sampled and verified y_init
    initially_correct: int  # of those, y_init verified correct
    revised: int            # problems whose y_init was given to the reviser
    kept: int               # verified-correct revisions written to the output
    output: str = ""
    attempts_log: str = ""

    def __str__(self) -> str:
        return (f"attempted {self.attempted}, initially correct {self.initially_correct}, revised {self.revised}, "
                f"kept {self.kept} -> {self.output}")


def _numbered_problems(problems) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """(line, row) pairs and the name errors give their source: the file, or `problems` for rows given in Python."""
    if isinstance(problems, (str, os.PathLike)):
        return read_jsonl_rows(problems), str(problems)  # a malformed line: UsageError naming file:line
    return [(index + 1, dict(row)) for index, row in enumerate(problems)], "problems"


def _write_output(path: Path, problems: list[PromptRow], attempts: dict[int, dict[str, Any]], max_kept: int | None) -> int:
    rows = []
    for source_row in sorted(attempts):
        attempt = attempts[source_row]
        for revision in attempt["kept"]:
            rows.append({**problems[source_row].raw, "source_row": source_row, "y_init": attempt["y_init"],
                         "initially_correct": attempt["initially_correct"],
                         "control_phrase": attempt["control_phrase"], "y_revised": revision})
    rows = rows[:max_kept] if max_kept is not None else rows
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    return len(rows)


class _Collector:
    def __init__(self, model, tokenizer, options: RevisionOptions):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.verifier = load_verifier(options.verifier, options.verifier_kwargs)
        self.phrases = control_phrases(options.control_phrase_family, options.control_phrase_correct,
                                       options.control_phrase_incorrect)
        self.delimiter_ids = {outcome: sdzero_delimiter_ids(tokenizer, phrase, options.separator)
                              for outcome, phrase in self.phrases.items()}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_token_ids = end_of_turn_ids(tokenizer, model)
        self.device = getattr(model, "device", torch.device("cpu"))

    def sample(self, prompts: list[list[int]], num_generations: int) -> list[list[int]]:
        """Completions (ids through the first end-of-turn token), `num_generations` per prompt, prompt-major."""
        o = self.options
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        rollouts = generate_rollouts(self.model, ids.to(self.device), mask.to(self.device),
                                     SamplingOptions(o.max_new_tokens, o.temperature, o.top_p, None, num_generations),
                                     self.eos_token_ids, self.tokenizer.pad_token_id)
        lengths = rollouts.completion_mask.sum(-1).tolist()
        return [rollouts.completion_ids[i, :length].tolist() for i, length in enumerate(lengths)]

    def verify(self, problem: PromptRow, response: list[int]) -> tuple[str, bool]:
        verdict = verify_completion(self.verifier, self.tokenizer, response, problem.record, row=problem.source_row,
                                    end_of_turn_ids=self.eos_token_ids, success_reward_threshold=self.options.success_reward_threshold)
        return verdict.text, verdict.correct

    def batch(self, problems: list[PromptRow]) -> list[dict[str, Any]]:
        o = self.options
        first = self.sample([p.prompt_ids for p in problems], 1)
        attempts = []
        for problem, response in zip(problems, first):
            text, correct = self.verify(problem, response)
            attempts.append({"source_row": problem.source_row, "fingerprint": problem.fingerprint, "y_init": text,
                             "initially_correct": correct, "control_phrase": None, "revisions": [], "kept": []})
        to_revise = [i for i, a in enumerate(attempts) if o.revise_correct or not a["initially_correct"]]
        if not to_revise:
            return attempts
        # The reviser's prefix is exactly the SD-Zero teacher input: chat(x) + y_init (ids as sampled, without the
        # end-of-turn token) + separator P_r separator.
        prefixes = []
        for i in to_revise:
            correct = attempts[i]["initially_correct"]
            attempts[i]["control_phrase"] = self.phrases[correct]
            prefix = sdzero_teacher_ids(problems[i].prompt_ids, first[i], self.delimiter_ids[correct],
                                        max_length=sys.maxsize, end_of_turn_ids=self.eos_token_ids)
            prefixes.append(prefix.teacher_input_ids)
        revisions = self.sample(prefixes, o.num_revisions)
        for k, response in enumerate(revisions):
            i = to_revise[k // o.num_revisions]
            text, correct = self.verify(problems[i], response)
            attempts[i]["revisions"].append(text)
            if correct:
                attempts[i]["kept"].append(text)
        return attempts


def collect_revisions(model, tokenizer, problems, output_path: str | os.PathLike, options: RevisionOptions | None = None,
                      *, progress: bool = True) -> CollectionSummary:
    """Collect SD-Zero revision data (see the module docstring); resumes from OUTPUT.attempts.jsonl.

    Args:
        model: a causal LM with `generate` (the model that will be SRT-trained).
        tokenizer: its tokenizer (chat template used for the prompts).
        problems: a JSONL path or an iterable of prompt rows (`prompt`, optional `system` / `tools`, task fields).
        output_path: the JSONL of kept revisions, rewritten from the attempts log at the end of every run.
        options: sampling, verification and phrasing (`RevisionOptions`); `verifier` is required.
        progress: show a progress bar over the problems.
    """
    from tqdm import tqdm

    options = options or RevisionOptions()
    options.check()
    columns = Columns(prompt=options.prompt_column, tools=options.tools_column)
    collector = _Collector(model, tokenizer, options)
    numbered, source = _numbered_problems(problems)
    items = prepare_prompt_rows(numbered, tokenizer, columns, options.max_prompt_length, source)
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = attempts_path(output)
    attempts = read_attempts(log_path, items)
    pending = [p for p in items if p.source_row not in attempts]
    kept = sum(len(a["kept"]) for a in attempts.values())
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="collect-revisions", unit="problem",
               disable=not progress)
    for start in range(0, len(pending), options.batch_size):
        if options.max_kept is not None and kept >= options.max_kept:
            break
        batch = pending[start: start + options.batch_size]
        # Seeded by the batch's first row: a resumed run samples its batches exactly as an uninterrupted one.
        torch.manual_seed(options.seed * 1_000_003 + batch[0].source_row)
        finished = collector.batch(batch)
        append_attempts(log_path, finished)
        for attempt in finished:
            attempts[attempt["source_row"]] = attempt
        kept += sum(len(a["kept"]) for a in finished)
        bar.update(len(batch))
        bar.set_postfix(kept=kept)
    bar.close()
    written = _write_output(output, items, attempts, options.max_kept)
    values = attempts.values()
    return CollectionSummary(
        attempted=len(attempts),
        initially_correct=sum(a["initially_correct"] for a in values),
        revised=sum(a["control_phrase"] is not None for a in values),
        kept=written,
        output=str(output),
        attempts_log=str(log_path),
    )


def main(argv: list[str] | None = None) -> int:
    """`sd-plugin collect-revisions`: see the module docstring and `--help`."""
    defaults = RevisionOptions()
    parser = argument_parser("collect-revisions", "Collect SD-Zero self-revision data (kept, verified-correct revisions).")
    parser.add_argument("--model", required=True, help="model path or Hub id (the model SRT will train)")
    parser.add_argument("--problems", required=True, help="JSONL of prompt rows: prompt, optional system / tools, task fields")
    parser.add_argument("--output", required=True, help="JSONL of kept revisions (the attempts log goes next to it)")
    parser.add_argument("--verifier", required=True, help="multiple_choice | tool_calls | boxed_math | python_tests | package.module:callable")
    parser.add_argument("--verifier-kwargs", type=json_object, default=None, help="JSON object of verifier keyword arguments")
    parser.add_argument("--num-revisions", type=int, default=defaults.num_revisions, help="revisions sampled per problem")
    parser.add_argument("--only-revise-incorrect", action="store_true", help="revise incorrect y_init only (default: both outcomes)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="per sampled response")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="problems per generate call")
    parser.add_argument("--success-reward-threshold", type=float, default=None,
                        help=f"a reward at or above this is correct (default: {defaults.success_reward_threshold})")
    parser.add_argument("--success-threshold", type=float, default=None, help=argparse.SUPPRESS)  # deprecated name
    parser.add_argument("--control-phrase-family", default=defaults.control_phrase_family, help="qwen | olmo")
    parser.add_argument("--control-phrase-correct", default=None, help="override the family's phrase after a correct y_init")
    parser.add_argument("--control-phrase-incorrect", default=None, help="override the family's phrase after a wrong y_init")
    parser.add_argument("--separator", default=defaults.separator, help="text around the control phrase, \\n for a newline (default: %(default)r)")
    parser.add_argument("--max-prompt-length", type=int, default=defaults.max_prompt_length, help="prompt tokens")
    parser.add_argument("--max-kept", type=int, default=None, help="stop once this many revisions are kept")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed")
    parser.add_argument("--prompt-column", default=defaults.prompt_column, help="prompt field of the problems")
    parser.add_argument("--tools-column", default=defaults.tools_column, help="tool schemas field of the problems")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="allow --output to overwrite the --problems file")
    args = parser.parse_args(argv)

    # Everything that can be refused is checked before the model loads (minutes on a large model).
    outputs = {"--output": args.output, "--output's attempts log": attempts_path(args.output)}
    refuse_output_over_input(outputs, [args.problems], args.force,
                             input_folders={"--model": args.model, "--problems": args.problems})
    try:
        threshold = resolve_deprecated_flag(args, "--success-threshold", "--success-reward-threshold",
                                            defaults.success_reward_threshold)
    except ValueError as error:
        raise UsageError(str(error)) from None
    options = RevisionOptions(
        verifier=args.verifier, verifier_kwargs=args.verifier_kwargs, num_revisions=args.num_revisions,
        revise_correct=not args.only_revise_incorrect, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
        success_reward_threshold=threshold, control_phrase_family=args.control_phrase_family,
        control_phrase_correct=args.control_phrase_correct, control_phrase_incorrect=args.control_phrase_incorrect,
        separator=args.separator.replace("\\n", "\n"), max_prompt_length=args.max_prompt_length,
        max_kept=args.max_kept, seed=args.seed, prompt_column=args.prompt_column, tools_column=args.tools_column,
    )
    try:
        options.check()
        load_verifier(args.verifier, args.verifier_kwargs)
    except (ValueError, ImportError, TypeError) as error:
        raise UsageError(str(error)) from None
    columns = Columns(prompt=args.prompt_column, tools=args.tools_column)
    for line, row in read_jsonl_rows(args.problems):
        try:
            prompt_record(row, None, columns)
        except RecordError as error:
            raise UsageError(f"{args.problems}:{line}: {error.reason}") from None
    check_model_source("--model", args.model)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    summary = collect_revisions(model, tokenizer, args.problems, args.output, options, progress=not args.no_progress)
    print(f"sd-plugin collect-revisions: {summary} (attempts log: {summary.attempts_log})")
    return 0
