"""The teacher: which weights score the completions, and how they follow the student.

Kinds:
- "base": the initial weights. With LoRA this is the same model with the adapter disabled (zero extra
  memory); with full fine-tuning a frozen in-memory copy made at the start (never a reload from disk).
- "ema": phi <- (1 - rate) phi + rate theta after every optimizer step. With LoRA the EMA is kept for the
  adapter's effective update Delta W = scale * B @ A of every LoRA layer (an EMA of A and B separately is
  not an EMA of B @ A), and applied through forward hooks while the adapter is disabled. With full
  fine-tuning it is a frozen copy updated in place.
- "live": the student itself, without gradient.
`sync_steps` > 0 additionally copies the student into the teacher every that many steps (hard sync).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F

KINDS = ("base", "ema", "live")


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a core dependency, but keep the teacher usable without it
        return False
    return isinstance(model, PeftModel)


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """Every LoRA layer of a PEFT model whose active adapter trains (name -> module)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters and module.active_adapters[0] in module.lora_A:
            if not isinstance(module.lora_A[module.active_adapters[0]], torch.nn.Linear):
                raise ValueError(f"EMA teacher supports LoRA on linear layers only; {name} is not one")
            layers[name] = module
    return layers


@torch.no_grad()
def lora_delta(module) -> torch.Tensor:
    """Effective weight update of a LoRA layer's active adapter, in float32."""
    adapter = module.active_adapters[0]
    return module.get_delta_weight(adapter).float()


class Teacher:
    """Owns the teacher's weights for one trainer; `scoring()` is the context in which to run its forward."""

    def __init__(self, model, kind: str = "base", ema_rate: float = 0.01, sync_steps: int = 0):
        if kind not in KINDS:
            raise ValueError(f"teacher kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 < ema_rate <= 1.0:
            raise ValueError(f"ema_rate must be in (0, 1], got {ema_rate}")
        self.kind, self.ema_rate, self.sync_steps = kind, ema_rate, sync_steps
        self.peft = is_peft_model(model)
        self.copy = None          # full fine-tuning: frozen copy of the student
        self.deltas = {}          # LoRA with ema/sync: name -> teacher's Delta W (float32)
        if kind == "live":
            return
        if self.peft:
            if kind == "ema" or sync_steps:
                self.deltas = {name: torch.zeros_like(lora_delta(m)) for name, m in lora_layers(model).items()}
        else:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    @contextmanager
    def scoring(self, model):
        """Yields the module whose forward is the teacher's (run it under torch.no_grad())."""
        if self.kind == "live":
            yield model
            return
        if self.copy is not None:
            yield self.copy
            return
        with ExitStack() as stack:
            stack.enter_context(model.disable_adapter())
            was_training = model.training
            model.eval()  # no LoRA dropout, no gradient checkpointing recompute for a no-grad forward
            stack.callback(model.train, was_training)
            if self.deltas:
                layers = lora_layers_any(model)
                for name, delta in self.deltas.items():
                    hook = layers[name].register_forward_hook(_add_delta(delta))
                    stack.callback(hook.remove)
            yield model

    @torch.no_grad()
    def step(self, model, global_step: int) -> None:
        """Called after every optimizer step: EMA update and/or hard sync."""
        if self.kind == "live" or (self.kind == "base" and not self.sync_steps):
            return
        sync = bool(self.sync_steps) and global_step % self.sync_steps == 0
        rate = 1.0 if sync else (self.ema_rate if self.kind == "ema" else 0.0)
        if rate == 0.0:
            return
        if self.copy is not None:
            for teacher_param, student_param in zip(self.copy.parameters(), model.parameters(), strict=True):
                teacher_param.lerp_(student_param.detach().to(teacher_param.dtype), rate)
            return
        layers = lora_layers_any(model)
        for name, delta in self.deltas.items():
            delta.lerp_(lora_delta(layers[name]).to(delta.device), rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.copy is not None and (self.kind == "ema" or self.sync_steps):
            return {f"copy.{k}": v for k, v in self.copy.state_dict().items()}
        return {f"delta.{k}": v for k, v in self.deltas.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.copy is not None and (self.kind == "ema" or self.sync_steps):
            self.copy.load_state_dict({k[len("copy."):]: v for k, v in state.items() if k.startswith("copy.")})
        for name, delta in self.deltas.items():
            delta.copy_(state[f"delta.{name}"])


def lora_layers_any(model) -> dict[str, torch.nn.Module]:
    # Same names as `lora_layers`, also while the adapter is disabled.
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _add_delta(delta: torch.Tensor):
    def hook(module, inputs, output):
        return output + F.linear(inputs[0].to(delta.dtype), delta).to(output.dtype)

    return hook
