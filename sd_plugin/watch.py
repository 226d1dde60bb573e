"""Loud failures during training: steps without a learning signal, and a collapse watch.

`SignalWatch` looks at every optimizer step. A step has no learning signal when no row of it gets a loss (SDPO /
SD-Zero: no rollout got a teacher prompt; every completion shorter than `num_loss_tokens_to_skip`), or when its loss
and gradient are exactly 0 (the teacher scores the rollouts exactly as the student does). Each such step warns with
the reason and what to change; `max_steps_without_signal` of them in a row stop the run with a RuntimeError (0 or
None: never). A step whose rollouts all hit `max_completion_length` warns too, but does not count toward the stop:
the teacher still scores a cut rollout token by token, so the step can teach.

`CollapseWatch` reads the logged metrics and warns, with the numbers, when training goes wrong in a way the loss
does not show (the thresholds are the README's "healthy ranges"):
- the training reward (SDPO's `self_distillation/reward_mean`, SD-Zero's `self_distillation/success_fraction`) falls more than
  REWARD_DROP below the mean of its first WINDOW logged values;
- `completions/mean_length` or `sampled_token_entropy` (mean of the last WINDOW logged values) leaves
  [1 / DRIFT_FACTOR, DRIFT_FACTOR] times its first logged value;
- a held-out evaluation (`eval_task_reward`, `eval_task_pass_rate`, `eval_prior_pass_rate`, ...) falls more than
  EVAL_DROP below its step-0 value.
With `stop_on_collapse` the first such finding also stops training (the Trainer's own stop: the final evaluation
and the save still run).

Both keep their history in plain lists and numbers: `state_dict()` / `load_state_dict()` carry them across a resume.
"""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback

LOG = logging.getLogger("sd_plugin")

WINDOW = 3             # logged values averaged for a "first-steps level" and for "now"
REWARD_DROP = 0.1      # training reward: absolute drop below its first-steps level that warns
DRIFT_FACTOR = 2.0     # completion length / entropy: ratio to the first logged value that warns (either way)
EVAL_DROP = 0.1        # held-out evaluation: absolute drop below step 0 that warns
TRUNCATION_WARN_EVERY = 10  # steps with every rollout cut: warn on the first and on every 10th in a row
REWARD_KEYS = ("self_distillation/reward_mean", "self_distillation/success_fraction")
DRIFT_KEYS = ("completions/mean_length", "sampled_token_entropy")
EVAL_KEYS = ("reward", "pass_rate", "sampled_pass_rate", "inference_pass_rate")


class SignalWatch:
    """Counts optimizer steps without a learning signal in a row; warns on each, stops at the limit."""

    def __init__(self, max_steps_without_signal: int | None):
        self.limit = max_steps_without_signal or 0
        self.without_signal_in_a_row = 0
        self.truncated_in_a_row = 0
        self.steps_without_signal = 0  # over the run (a resumed run counts on)

    def end_step(self, step: int, *, signal_rows: int, rows: int, sampled: int, truncated: int, loss: float,
                 grad_norm: float | None, no_signal_advice: str, max_completion_length: int) -> None:
        """Judge optimizer step `step` (1-based): warn, and raise when `max_steps_without_signal` is reached.

        rows: the step's rows (all processes); sampled: those with a rollout (not cross-entropy rows), truncated:
        the rollouts that hit max_completion_length; signal_rows: rows that can teach (`signal_rows` of the trainer).
        """
        reason = None
        if rows and signal_rows == 0:
            reason = f"no row of the step gets a loss ({rows} rows): {no_signal_advice}"
        elif loss == 0.0 and grad_norm is not None and grad_norm == 0.0:
            reason = ("the loss and its gradient are exactly 0: the teacher scores the rollouts exactly as the student "
                      "does, so there is nothing to learn (is the teacher the student? with a full fine-tune, "
                      "teacher_model_kind: base is the student itself; use ema or initial)")
        if sampled and truncated == sampled:
            self.truncated_in_a_row += 1
            if self.truncated_in_a_row % TRUNCATION_WARN_EVERY == 1:
                LOG.warning(
                    "step %d: every rollout (%d) hit max_completion_length=%d without an end-of-turn token (%d step(s) "
                    "in a row): the model is trained on cut answers; raise max_completion_length, or check that the "
                    "chat template ends the turn with the tokenizer's eos", step, sampled, max_completion_length,
                    self.truncated_in_a_row)
        else:
            self.truncated_in_a_row = 0
        if reason is None:
            self.without_signal_in_a_row = 0
            return
        self.without_signal_in_a_row += 1
        self.steps_without_signal += 1
        in_a_row = self.without_signal_in_a_row
        if self.limit and in_a_row >= self.limit:
            raise RuntimeError(
                f"{in_a_row} optimizer steps in a row (the last: step {step}) had no learning signal; stopping "
                f"(max_steps_without_signal={self.limit}; 0 or null never stops). The reason: {reason}")
        stop = f"the run stops at {self.limit}" if self.limit else "max_steps_without_signal is off"
        LOG.warning("step %d has no learning signal (%d in a row, %s): %s", step, in_a_row, stop, reason)

    def state_dict(self) -> dict:
        return {"without_signal_in_a_row": self.without_signal_in_a_row, "truncated_in_a_row": self.truncated_in_a_row,
                "steps_without_signal": self.steps_without_signal}

    def load_state_dict(self, state: dict) -> None:
        self.without_signal_in_a_row = int(state.get("without_signal_in_a_row", 0))
        self.truncated_in_a_row = int(state.get("truncated_in_a_row", 0))
        self.steps_without_signal = int(state.get("steps_without_signal", 0))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class CollapseWatch(TrainerCallback):
    """Warns (and with `stop_on_collapse` stops) when the logged metrics leave their healthy ranges (module doc)."""

    def __init__(self, stop_on_collapse: bool = False):
        self.stop_on_collapse = stop_on_collapse
        self.history: dict[str, list[list[float]]] = {}  # metric -> [[step, value], ...] as logged
        self.alarms: dict[str, str] = {}                 # metric -> the open finding (cleared when it recovers)
        self.findings: list[dict] = []                   # every finding: {"step", "metric", "message"}

    def observe(self, step: int, logs: dict) -> list[str]:
        """Record the logged values of the watched metrics at `step`; returns the new findings' messages."""
        for key, value in logs.items():
            if isinstance(value, (int, float)) and math.isfinite(value) and self.watched(key):
                self.history.setdefault(key, []).append([step, float(value)])
        found = []
        for key in [k for k in logs if k in self.history]:
            message = self.judge(key)
            if message is None:
                self.alarms.pop(key, None)
            elif key not in self.alarms:
                self.alarms[key] = message
                self.findings.append({"step": step, "metric": key, "message": message})
                found.append(message)
        return found

    @staticmethod
    def watched(key: str) -> bool:
        if key in REWARD_KEYS or key in DRIFT_KEYS:
            return True
        return key.startswith("eval_") and any(key.endswith(f"_{name}") for name in EVAL_KEYS)

    def judge(self, key: str) -> str | None:
        points = self.history[key]
        values = [value for _, value in points]
        if key in REWARD_KEYS:
            if len(values) < 2 * WINDOW:
                return None
            first, now = _mean(values[:WINDOW]), _mean(values[-WINDOW:])
            if now < first - REWARD_DROP:
                return (f"training reward {key} fell to {now:.3f} (mean of the last {WINDOW} logged values) from "
                        f"{first:.3f} in the first steps: the policy is getting worse at the task (lower the learning "
                        "rate, check the teacher's contexts with log_completions)")
            return None
        if key in DRIFT_KEYS:
            if len(values) < 1 + WINDOW or values[0] <= 0:
                return None
            first, now = values[0], _mean(values[-WINDOW:])
            if not 1.0 / DRIFT_FACTOR <= now / first <= DRIFT_FACTOR:
                what = "completion length" if key == "completions/mean_length" else "token entropy"
                return (f"{what} {key} is {now:.3f} (mean of the last {WINDOW} logged values), {now / first:.2f}x its "
                        f"first value {first:.3f} (step {points[0][0]:g}): outside [{1 / DRIFT_FACTOR:g}x, "
                        f"{DRIFT_FACTOR:g}x], a sign of collapse (repetition, empty or endless answers); lower the "
                        "learning rate and look at the samples (log_completions)")
            return None
        if len(values) < 2:
            return None
        (first_step, first), (step, now) = points[0], points[-1]
        if now < first - EVAL_DROP:
            return (f"held-out {key} fell to {now:.3f} at step {step:g} from {first:.3f} at step {first_step:g}: "
                    "the model is getting worse on held-out prompts (forgetting when it is the prior set)")
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        messages = self.observe(state.global_step, logs or {})
        for message in messages:
            LOG.warning("collapse watch, step %d: %s%s", state.global_step, message,
                        "; stopping (stop_on_collapse)" if self.stop_on_collapse else "")
        if messages and self.stop_on_collapse:
            control.should_training_stop = True

    def state_dict(self) -> dict:
        return {"history": {key: [list(point) for point in points] for key, points in self.history.items()},
                "alarms": dict(self.alarms), "findings": [dict(finding) for finding in self.findings]}

    def load_state_dict(self, state: dict) -> None:
        self.history = {key: [list(point) for point in points] for key, points in state.get("history", {}).items()}
        self.alarms = dict(state.get("alarms", {}))
        self.findings = [dict(finding) for finding in state.get("findings", [])]
