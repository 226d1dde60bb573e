"""The trainer's numerics guards: a non-finite step is skipped, never applied; `debug_numerics` checks divergences.

A mixin of `SelfDistillationTrainer` (`transformers.Trainer`): it reads `options.max_consecutive_nonfinite_steps`
and `options.distillation_mode`, and writes `skipped_step_fraction` into the trainer's train metrics.
"""

from __future__ import annotations

import logging
import math

import torch

from sd_plugin.checkpoints import StateHooks

LOG = logging.getLogger("sd_plugin")


class NonFiniteStepGuard:
    """`training_step` with the non-finite guard, and the `debug_numerics` check of one step's divergences."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's forward + backward of one micro-batch, then the non-finite guard.

        A micro-batch whose loss is not finite marks its optimizer step (a NaN or inf logit makes the loss
        non-finite: the loss sums over every logit of the completion tokens). After the last micro-batch of the
        step, once the gradients are synchronized, `guard_optimizer_step` skips the step when any process saw
        a non-finite loss or holds a non-finite gradient. The backward of a non-finite loss still runs (every
        process takes part in the gradient all-reduce); its gradients are dropped, never applied.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            self._nonfinite_loss_in_step = True
            for values in self._metrics["train"].values():  # keep this micro-batch's NaNs out of the logged means
                values[:] = [value for value in values if math.isfinite(value)]
        if self.accelerator.sync_gradients:
            self.guard_optimizer_step()
        return loss

    def guard_optimizer_step(self) -> bool:
        """Skip the optimizer step about to run when it is non-finite on any process; returns whether it is skipped.

        Called once the step's gradients are complete. A skipped step's gradients are dropped (set to None), so
        the optimizer changes neither the weights nor its own state; global_step and the learning-rate schedule
        still advance. Skips are counted (`nonfinite_steps_skipped`, logged as `skipped_step_fraction`) and
        warned about; `max_consecutive_nonfinite_steps` skips in a row stop the run with a RuntimeError.
        Under DeepSpeed the optimizer steps inside backward: there the skip is DeepSpeed's own overflow check,
        and this guard only counts and stops.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        local_grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
        nonfinite_loss = self.__dict__.pop("_nonfinite_loss_in_step", False)
        nonfinite_grad = bool(local_grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(local_grads)))
        # How many processes saw each; every process must take the same decision (FSDP / ZeRO shard gradients).
        counts = torch.tensor([float(nonfinite_loss), float(nonfinite_grad)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        skipped = bool(counts.sum() > 0)
        self._metrics["train"]["skipped_step_fraction"].append(float(skipped))
        if not skipped:
            self._nonfinite_steps_in_a_row = 0
            return False
        for param in params:
            param.grad = None
        self._nonfinite_steps_in_a_row = self.__dict__.get("_nonfinite_steps_in_a_row", 0) + 1
        self._nonfinite_steps_skipped = self.nonfinite_steps_skipped + 1
        step, in_a_row, limit = self.state.global_step + 1, self._nonfinite_steps_in_a_row, self.options.max_consecutive_nonfinite_steps
        what = (f"loss on {int(counts[0])} of {self.accelerator.num_processes} process(es)" if counts[0] > 0
                else "gradient")
        LOG.warning("step %d skipped: non-finite %s; %d step(s) skipped so far, %d in a row (the run stops at %d)",
                    step, what, self._nonfinite_steps_skipped, in_a_row, limit)
        if in_a_row >= limit:
            raise RuntimeError(
                f"{in_a_row} optimizer steps in a row (the last: step {step}) had a non-finite {what}; stopping "
                f"(max_consecutive_nonfinite_steps={limit}). No skipped step changed the weights. See 'Running long "
                "jobs' in the README: lower the learning rate, look at the rows of these steps, resume from the last "
                "checkpoint."
            )
        return True

    def numerics_state(self) -> StateHooks:
        """The guard's counters as checkpoint state: a resumed run stops after as many skips in a row as the
        uninterrupted one."""
        def load(state: dict) -> None:
            self._nonfinite_steps_in_a_row = state["in_a_row"]
            self._nonfinite_steps_skipped = state["skipped"]

        return StateHooks(lambda: {"in_a_row": self.__dict__.get("_nonfinite_steps_in_a_row", 0),
                                   "skipped": self.nonfinite_steps_skipped}, load)

    @property
    def nonfinite_steps_skipped(self) -> int:
        """Optimizer steps skipped so far for a non-finite loss or gradient (this process's run)."""
        return self.__dict__.get("_nonfinite_steps_skipped", 0)

    def check_divergence_values(self, out) -> None:
        """`debug_numerics`: every per-token divergence of the step must be >= 0 within 1e-4, else RuntimeError.

        A divergence (forward / reverse KL, generalized JSD, cross-entropy) is never negative; a value below
        -1e-4 means the loss is computed wrongly or in too low a precision. The sampled-token estimator of
        `distillation_mode: sampled` is negative for some tokens by design and is not checked; non-finite
        values are left to the non-finite guard (the step is skipped).
        """
        if self.options.distillation_mode == "sampled_token" or out.per_token_divergence is None:  # Liger: loss only
            return
        tolerance = 1e-4
        values = out.per_token_divergence.detach().float()
        values = values[torch.isfinite(values)]
        if values.numel() and values.min().item() < -tolerance:
            below = int((values < -tolerance).sum())
            raise RuntimeError(
                f"debug_numerics: {below} of {values.numel()} per-token divergences of step {self.state.global_step + 1} "
                f"are below -{tolerance:g} (min {values.min().item():.4g}); a divergence is never negative, so the "
                "loss is computed wrongly or in too low a precision"
            )
