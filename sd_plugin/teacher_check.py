"""Check the teacher before training: does the model, shown the demonstration, do the task? (`sd-plugin check-teacher`)

SDFT can only teach what its teacher shows: the student is pulled toward the model's own distribution with
the demonstration in context (the teacher template). A template under which the model does not do the task
in context (a small model asked for "a response of your own" writes prose) trains for hours and teaches
nothing. On a few rows of the training data, for each template, this measures:

- `exact_match`: the teacher's greedy answer (demonstration in context) equals the demonstration;
- `similarity`: difflib's ratio of the two, case and whitespace normalised (1 = the same text);
- `verifier_pass_rate`: the `eval_verifier`'s pass rate on the teacher's answers, scored against the training
  row (None without a verifier, or when the verifier does not pass the demonstrations themselves: then the
  training rows lack the fields it reads);
- `in_context_gain`: the mean per-token log-prob of the demonstration under the teacher prompt minus under
  the student prompt (nats per token): how much the context moves the model toward the demonstration, the
  signal SDFT passes on. <= 0: the teacher does not prefer the demonstration to what the student already does.

`best_template` ranks templates by the share of rows done (verifier pass rate, else exact match), then
similarity, then gain. `teacher_template: auto` trains with it (`SDFTTrainer`); with any other template the
trainer runs the configured one on `teacher_check_rows` rows at step 0, logs `teacher_check/*` and warns
when the gain is <= 0.

    sd-plugin check-teacher CONFIG.yml [--rows N] [--templates a,b] [--max-new-tokens N] [--json]
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from sd_plugin.contexts import (
    AUTO_CANDIDATES,
    demonstration_ids,
    demonstration_text,
    render_ids,
    resolve_template,
    sdft_teacher_messages,
    strip_thinking,
    template_name,
)
from sd_plugin.data import Columns, RecordError, SDFTRecord, end_of_turn_ids, sdft_record
from sd_plugin.rows import left_pad, right_pad

LOG = logging.getLogger("sd_plugin")
# A template "does the task" when the teacher gets at least this share of rows right (pass rate or exact match).
DOES_TASK = 0.5
# Greedy answers stop this many tokens after the longest demonstration (they are compared to it).
ANSWER_SLACK_TOKENS = 16
EXAMPLES_KEPT = 3


@dataclass
class TemplateScore:
    """How the teacher does under one template, on `rows` training rows (see the module doc)."""

    name: str
    template: str
    rows: int
    exact_match: float
    similarity: float
    verifier_pass_rate: float | None
    in_context_gain: float
    teacher_logprob: float   # mean per-token log-prob of the demonstration with it in context
    student_logprob: float   # the same under the student prompt
    verdict: str = ""
    examples: list[dict[str, str]] = field(default_factory=list)

    @property
    def done_rate(self) -> float:
        """Share of rows the teacher does right: the verifier's pass rate when there is one, else exact match."""
        return self.verifier_pass_rate if self.verifier_pass_rate is not None else self.exact_match

    def rank_key(self) -> tuple[float, float, float]:
        gain = self.in_context_gain if math.isfinite(self.in_context_gain) else -math.inf
        return (round(self.done_rate, 3), round(self.similarity, 3), gain)


@dataclass
class TeacherCheck:
    """Scores per template, the best one and a verdict in words."""

    scores: list[TemplateScore]
    configured: str | None       # the name of the configured template ("auto" when auto)
    best: str                    # name of the best template
    verdict: str
    verifier: str | None
    verifier_note: str | None    # why the verifier's pass rate is not reported, if it is not
    seconds: float

    def score(self, name: str) -> TemplateScore:
        return next(s for s in self.scores if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"configured": self.configured, "best": self.best, "verdict": self.verdict, "verifier": self.verifier,
                "verifier_note": self.verifier_note, "seconds": round(self.seconds, 1),
                "templates": [asdict(s) | {"done_rate": s.done_rate} for s in self.scores]}

    def metrics(self, name: str | None = None, prefix: str = "teacher_check/") -> dict[str, float]:
        """One template's numbers as flat metrics (the trainers log them at step 0)."""
        s = self.score(name or self.best)
        out = {"exact_match": s.exact_match, "similarity": s.similarity, "in_context_gain": s.in_context_gain,
               "teacher_logprob": s.teacher_logprob, "student_logprob": s.student_logprob}
        if s.verifier_pass_rate is not None:
            out["verifier_pass_rate"] = s.verifier_pass_rate
        return {prefix + key: value for key, value in out.items()}

    def table(self) -> str:
        rows = self.scores[0].rows if self.scores else 0
        lines = [f"Teacher check on {rows} training rows ({self.seconds:.0f} s): the model with the demonstration in context",
                 f"{'template':<22}{'exact':>7}{'similar':>9}{'verifier':>10}{'gain':>9}  verdict"]
        for s in self.scores:
            passed = "-" if s.verifier_pass_rate is None else f"{s.verifier_pass_rate:.2f}"
            mark = " *" if s.name == self.best else ("  (configured)" if s.name == self.configured else "")
            name = s.name if len(s.name) <= 20 else s.name[:17] + "..."
            lines.append(f"{name:<22}{s.exact_match:>7.2f}{s.similarity:>9.2f}{passed:>10}{s.in_context_gain:>+9.3f}  "
                         f"{s.verdict}{mark}")
        lines.append("exact: greedy answer == demonstration; similar: normalised text similarity; verifier: "
                     f"{self.verifier or 'none configured (eval_verifier)'} pass rate; gain: log-prob of the demonstration "
                     "per token, teacher minus student (nats)")
        if self.verifier_note:
            lines.append(f"verifier: {self.verifier_note}")
        best = self.score(self.best)
        if best.examples:
            lines.append(f"teacher's answers under {self.best} (demonstration -> answer):")
            lines += [f"  {e['demonstration'][:70]!r} -> {e['answer'][:70]!r}" for e in best.examples]
        lines.append(self.verdict)
        return "\n".join(lines)


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", strip_thinking(text)).strip().casefold()


def similarity(answer: str, demonstration: str) -> float:
    """difflib's ratio of the two texts, reasoning stripped, case and whitespace normalised (1: the same)."""
    return difflib.SequenceMatcher(None, normalised(answer), normalised(demonstration), autojunk=False).ratio()


def cannot_teach(score: TemplateScore) -> bool:
    """The teacher neither does the task on any checked row nor comes close (the verdict "SDFT cannot teach it")."""
    return score.done_rate == 0 and score.similarity < 0.8


def template_verdict(score: TemplateScore) -> str:
    """One line in words: can SDFT teach with this template?"""
    if not math.isfinite(score.in_context_gain) or score.in_context_gain <= 0:
        return ("the demonstration in context does not raise its log-prob (gain <= 0): the teacher does not prefer it, "
                "SDFT has no signal")
    if score.done_rate >= DOES_TASK:
        return "the teacher does the task in context: SDFT can teach it"
    if not cannot_teach(score):
        return "the teacher does the task on some rows only: SDFT learns slowly at best"
    return "the teacher does not do the task in context: SDFT cannot teach it"


@torch.no_grad()
def demonstration_logprobs(model, prompts: list[list[int]], targets: list[list[int]], chunk: int = 64) -> list[float]:
    """Mean per-token log-prob of each target given its prompt (fp32 log-softmax, `chunk` positions at a time)."""
    from sd_plugin.teacher import output_head
    from sd_plugin.trainers.step import completion_hidden_states

    device = next(model.parameters()).device
    pad = 0
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    target_ids, target_mask = right_pad(targets, pad)
    prompt_ids, prompt_mask, target_ids, target_mask = (t.to(device) for t in (prompt_ids, prompt_mask, target_ids, target_mask))
    hidden = completion_hidden_states(model, model, prompt_ids, prompt_mask, target_ids, target_mask)
    weight, bias = output_head(model)
    total = torch.zeros(len(prompts), device=device)
    for start in range(0, hidden.shape[1], chunk):
        logits = torch.nn.functional.linear(hidden[:, start:start + chunk], weight, bias).float()
        picked = logits.log_softmax(-1).gather(-1, target_ids[:, start:start + chunk, None]).squeeze(-1)
        total += (picked * target_mask[:, start:start + chunk]).sum(-1)
    return (total / target_mask.sum(-1).clamp(min=1)).tolist()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def check_teacher(
    model,
    tokenizer,
    rows: list[dict[str, Any]],
    templates: list[str] | dict[str, str],
    *,
    columns: Columns | None = None,
    verifier: Any = None,
    verifier_name: str | None = None,
    configured: str | None = None,
    teacher: Callable[[], Any] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
) -> TeacherCheck:
    """Score each template on `rows` (raw training rows: prompt, demonstration, the verifier's fields).

    `templates`: names or strings (a list) or {name: template}. `teacher()` is a context manager that yields
    the teacher module (the trainer's `Teacher.scoring`); by default `model` itself, which is the teacher of a
    fresh LoRA run. The student log-prob is `model`'s. The greedy answers stop 16 tokens after the longest
    demonstration, or at `max_new_tokens` when that is fewer (the trainer passes max_completion_length).
    """
    from sd_plugin.evaluation import greedy_answers
    from sd_plugin.verifiers import safe_verify

    start = time.time()
    columns = columns or Columns()
    if isinstance(templates, dict):
        named = dict(templates)
    else:
        named = {template_name(t): t for t in templates}
    for name, text in named.items():
        try:
            resolve_template(text)
        except ValueError as error:
            raise ValueError(f"template {name!r}: {error}") from None
    records: list[SDFTRecord] = []
    for index, raw in enumerate(rows):
        records.append(sdft_record(raw, index, columns))
    if not records:
        raise ValueError("check_teacher needs at least one training row")
    demos = [demonstration_text(tokenizer, r) for r in records]
    demo_ids = []
    for index, record in enumerate(records):
        try:
            demo_ids.append(demonstration_ids(tokenizer, record))
        except RecordError as error:
            raise RecordError(index, error.reason) from None
    student_prompts = [render_ids(tokenizer, r.messages, r.tools) for r in records]
    eos = end_of_turn_ids(tokenizer, model)
    cap = max(len(ids) for ids in demo_ids) + ANSWER_SLACK_TOKENS
    cap = min(cap, max_new_tokens) if max_new_tokens else cap
    teacher = teacher or (lambda: contextlib.nullcontext(model))
    task_fields = [{k: v for k, v in r.extra.items()} | {"messages": r.messages} for r in records]

    verifier_note = None
    if verifier is not None:
        # The verifier must pass the demonstrations themselves, or its pass rate on the teacher says nothing.
        own = [safe_verify(verifier, r.messages, d, f, row=i).reward for i, (r, d, f) in enumerate(zip(records, demos, task_fields))]
        if _mean([float(x >= 1.0) for x in own]) < 1.0:
            verifier_note = (f"{verifier_name or 'the verifier'} passes {sum(x >= 1.0 for x in own)} of {len(own)} "
                             "demonstrations themselves (do the training rows have the fields it reads?): its pass rate "
                             "is left out, exact match ranks the templates")
            verifier = None

    was_training = model.training
    model.eval()
    try:
        student_lp = []
        for i in range(0, len(records), batch_size):
            student_lp += demonstration_logprobs(model, student_prompts[i:i + batch_size], demo_ids[i:i + batch_size])
        scores = []
        for name, text in named.items():
            teacher_prompts = []
            for index, (record, demo) in enumerate(zip(records, demos)):
                try:
                    teacher_prompts.append(render_ids(tokenizer, sdft_teacher_messages(record.messages, demo, text), record.tools))
                except RecordError as error:
                    raise RecordError(index, f"template {name!r}: {error.reason}") from None
            with teacher() as teacher_model:
                answers = greedy_answers(teacher_model, tokenizer, teacher_prompts, cap, eos, batch_size=batch_size)
                teacher_lp = []
                for i in range(0, len(records), batch_size):
                    teacher_lp += demonstration_logprobs(teacher_model, teacher_prompts[i:i + batch_size], demo_ids[i:i + batch_size])
            texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
            exact = [float(strip_thinking(t) == strip_thinking(d)) for t, d in zip(texts, demos)]
            similar = [similarity(t, d) for t, d in zip(texts, demos)]
            passed = None
            if verifier is not None:
                passed = _mean([float(safe_verify(verifier, r.messages, t, f, row=i).reward >= 1.0)
                                for i, (r, t, f) in enumerate(zip(records, texts, task_fields))])
            score = TemplateScore(
                name=name, template=resolve_template(text), rows=len(records), exact_match=_mean(exact),
                similarity=_mean(similar), verifier_pass_rate=passed,
                in_context_gain=_mean(teacher_lp) - _mean(student_lp), teacher_logprob=_mean(teacher_lp),
                student_logprob=_mean(student_lp),
                examples=[{"demonstration": d, "answer": t} for d, t in list(zip(demos, texts))[:EXAMPLES_KEPT]],
            )
            score.verdict = template_verdict(score)
            scores.append(score)
    finally:
        model.train(was_training)
    best = max(scores, key=TemplateScore.rank_key)
    return TeacherCheck(scores, configured, best.name, overall_verdict(scores, best, configured),
                        verifier_name if verifier is not None else None, verifier_note, time.time() - start)


def overall_verdict(scores: list[TemplateScore], best: TemplateScore, configured: str | None) -> str:
    """What to do, in words: keep the configured template, switch to the best one, or fix the data / model."""
    what = "verifier pass rate" if best.verifier_pass_rate is not None else "exact match"
    best_line = (f"best template: {best.name} ({what} {best.done_rate:.2f}, similarity {best.similarity:.2f}, "
                 f"gain {best.in_context_gain:+.3f})")
    if best.done_rate < DOES_TASK and best.similarity < 0.8:
        return (f"{best_line}. No template makes the teacher do the task in context: SDFT cannot teach it with this "
                "model. Try a custom template that says what the demonstration is (e.g. \"Answer with one line of JSON "
                "exactly like this:\"), a larger model, or SFT.")
    if configured in (None, "auto") or configured == best.name:
        return f"{best_line}: train with it" + (" (teacher_template: auto picks it)" if configured == "auto" else "") + "."
    chosen = next((s for s in scores if s.name == configured), None)
    if chosen is not None and chosen.rank_key() >= best.rank_key():
        return f"{best_line}; the configured {configured} does as well: keep it."
    return f"{best_line}; the configured {configured} does worse: set teacher_template: {best.name} (or auto)."


def sample_rows(rows: list[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` rows drawn without replacement with a fixed seed (all of them when there are fewer)."""
    if count >= len(rows):
        return list(rows)
    return random.Random(seed).sample(list(rows), count)


def candidate_templates(configured: str | None, extra: list[str] | None = None,
                        only: list[str] | None = None) -> dict[str, str]:
    """{name: template} to score: `only` when given; else the configured one (unless auto), the built-in
    candidates (`contexts.AUTO_CANDIDATES`) and the user's `extra` ones."""
    names = list(only) if only else ([configured] if configured and configured != "auto" else []) + list(AUTO_CANDIDATES) + list(extra or [])
    out = {}
    for text in names:
        out.setdefault(template_name(text), text)
    return out


# ------------------------------------------------------------------ the command
def rows_from_config(cfg: dict, source: str) -> tuple[list[dict], Columns, str]:
    """The raw training rows of an Axolotl config's SDFT datasets, their columns and the first path."""
    from sd_plugin.cli import UsageError
    from sd_plugin.files import read_jsonl_rows

    entries = [e for e in cfg.get("datasets") or [] if isinstance(e, dict)]
    sdft_entries = [e for e in entries if str(e.get("type", "")).endswith("strategies.sdft")]
    if not sdft_entries:
        raise UsageError(f"{source}: no datasets entry with type: sd_plugin.axolotl.strategies.sdft "
                         "(check-teacher reads prompt + demonstration rows)")
    block = cfg.get("sdft") or {}
    rows: list[dict] = []
    columns = None
    for entry in sdft_entries:
        path = entry.get("path")
        if not path or not str(path).endswith((".jsonl", ".json")):
            raise UsageError(f"{source}: datasets path {path!r}: check-teacher reads local JSONL files only")
        columns = Columns(prompt=entry.get("field_human") or block.get("prompt_column", "prompt"),
                          demonstration=entry.get("field_model") or block.get("demonstration_column", "demonstration"),
                          tools=entry.get("field_tools") or block.get("tools_column", "tools"))
        rows += [row for _, row in read_jsonl_rows(path)]
    return rows, columns, str(sdft_entries[0]["path"])


def main(argv: list[str] | None = None) -> int:
    from sd_plugin.cli import UsageError, argument_parser
    from sd_plugin.files import read_config_file

    parser = argument_parser("check-teacher", "Does the model, shown the demonstration, do the task? Scores teacher "
                             "templates on a few training rows (SDFT can only teach what its teacher shows).")
    parser.add_argument("config", help="Axolotl YAML config with trainer_type: sdft and an sdft datasets entry")
    parser.add_argument("--rows", type=int, default=8, help="training rows to score (drawn with a fixed seed)")
    parser.add_argument("--templates", default=None,
                        help="comma-separated template names to score (default: the configured one and the built-in candidates)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap of the teacher's greedy answers (they stop 16 tokens after the longest demonstration in any case)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.rows < 1:
        raise UsageError("--rows must be >= 1")
    cfg = read_config_file(args.config)
    if (cfg.get("trainer_type") or "sdft") != "sdft":
        raise UsageError(f"{args.config}: trainer_type is {cfg.get('trainer_type')!r}: check-teacher scores SDFT's teacher "
                         "(the demonstration in context)")
    block = dict(cfg.get("sdft") or {})
    configured = block.get("teacher_template", "paper")
    extra = block.get("teacher_template_candidates") or []
    only = [t.strip() for t in args.templates.split(",") if t.strip()] if args.templates else None
    try:
        templates = candidate_templates(configured, extra, only)
        for name, text in templates.items():
            resolve_template(text)
    except ValueError as error:
        raise UsageError(f"{args.config}: {error}") from None
    rows, columns, path = rows_from_config(cfg, args.config)
    sample = sample_rows(rows, args.rows, args.seed)
    verifier, verifier_name = None, block.get("eval_verifier")
    if verifier_name:
        from sd_plugin.verifiers import load_verifier

        try:
            verifier = load_verifier(verifier_name, block.get("verifier_kwargs"))
        except (ValueError, ImportError, TypeError) as error:
            raise UsageError(f"{args.config}: sdft.eval_verifier: {error}") from None
    model_path = cfg.get("base_model")
    if not model_path:
        raise UsageError(f"{args.config}: no base_model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.get("tokenizer_config") or model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    except OSError as error:
        raise UsageError(f"{args.config}: base_model {model_path!r}: {error}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        result = check_teacher(model, tokenizer, sample, templates, columns=columns, verifier=verifier,
                               verifier_name=verifier_name, configured=template_name(configured),
                               max_new_tokens=args.max_new_tokens)
    except RecordError as error:
        raise UsageError(f"{path}: {error}") from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
