"""The teacher: which weights score the completions, and how they follow the student.

Kinds:
- "base": the initial weights. With LoRA this is the same model with the adapter disabled (zero extra
  memory); with full fine-tuning a frozen in-memory copy made at the start (never a reload from disk).
- "ema": phi <- (1 - rate) phi + rate theta after every optimizer step. With LoRA the EMA is kept for the
  adapter's effective update Delta W = scale * B @ A of every LoRA layer (an EMA of A and B separately is
  not an EMA of B @ A), and applied through forward hooks while the adapter is disabled; as a dense fp32
  [out, in] matrix per layer (`ema_rank` 0, exact) or as rank-`ema_rank` factors (memory ~ rank x (out + in),
  exact until the EMA's rank exceeds it, then the best rank-k approximation, its error measured). With full
  fine-tuning it is a frozen copy updated in place.
- "live": the student itself, without gradient (scored in eval mode: no dropout).
- "initial": the student as it is at step 0, frozen. Equal to "base" for a fresh LoRA adapter or full
  fine-tuning; with a loaded adapter (round 2 continuing from round 1: `lora_model_dir`,
  `PeftModel.from_pretrained`) it is the model WITH that adapter, where "base" is the model without any
  adapter. The EMA teacher also starts from the student's current update, never from zero.
`sync_steps` (TRL's `teacher_sync_steps`): the EMA update runs every that many optimizer steps (1: every step);
with `ema_rate` 1.0 it is a hard copy of the student every `sync_steps` steps.

Sharded training: the EMA update reads the student's parameters in full. Under DeepSpeed ZeRO-3 they
are gathered with `deepspeed.zero.GatheredParameters`, under FSDP (version 1) with `summon_full_params`, and
FSDP2's DTensors are read with `full_tensor()` (`full_parameters`, `full_value`). For LoRA only the adapter
weights are gathered, and the teacher's deltas are full tensors on every process. The full fine-tuning
copy cannot be partitioned by ZeRO-3 (it is refused there: use LoRA or `live`); under FSDP it is a full
copy per process, made before the model is sharded.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F

KINDS = ("base", "ema", "live", "initial")
# LoRA initialisations that rewrite the base weights (a residual): "adapter disabled" is then not the model
# the run started from.
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


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
            layers[unwrapped_name(name)] = module
    return layers


@torch.no_grad()
def lora_delta(module) -> torch.Tensor:
    """Effective weight update of a LoRA layer's active adapter, in float32 (a full tensor, also under FSDP2),
    as an [out, in] matrix (what `F.linear` applies) for every layer kind.

    peft's `get_delta_weight` returns it in the base weight's layout, which for `fan_in_fan_out` layers
    (GPT-2's Conv1D, whose weight is [in, out]) is the transpose: transposed back here.
    """
    adapter = module.active_adapters[0]
    weight_a, weight_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if is_dtensor(weight_a) or is_dtensor(weight_b):
        # FSDP2 shards A and B along their first dimension: gather both, then form B @ A ([out, in]) as peft does.
        return (full_value(weight_b).float() @ full_value(weight_a).float()) * module.scaling[adapter]
    delta = module.get_delta_weight(adapter).float()
    return delta.T.contiguous() if module.fan_in_fan_out else delta


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2 / tensor parallel shards)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The full (unsharded) value of a parameter: DTensors are all-gathered, other tensors returned as they are."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def is_zero3_partitioned(params) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions any of `params` (it tags them with `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in params)


def fsdp1_modules(model) -> list[torch.nn.Module]:
    """The FullyShardedDataParallel (version 1) units inside `model` (none without torch.distributed)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


@contextmanager
def full_parameters(model, params=None):
    """Inside the block, `params` (default: all of `model`'s) hold their full values, for reading.

    Every process must enter it (the gathers are collectives). ZeRO-3: `GatheredParameters` on `params`
    only (for LoRA: the adapter weights). FSDP1: `summon_full_params` on the whole model (all its units are
    unsharded at once, so it briefly needs the full model's memory). Unsharded models and FSDP2 (read
    DTensors with `full_value`): nothing to do.
    """
    params = list(model.parameters() if params is None else params)
    if is_zero3_partitioned(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    if fsdp1_modules(model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
        return
    yield


def unwrapped_name(name: str) -> str:
    """A parameter name without the wrapper prefixes FSDP and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def lora_adapter_parameters(layers: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The A and B weights of every LoRA layer's adapters (what the EMA update reads)."""
    params = []
    for module in layers.values():
        for adapter in module.lora_A:
            params += [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
    return params


class Teacher:
    """Owns the teacher's weights for one trainer; `scoring()` is the context in which to run its forward."""

    def __init__(self, model, kind: str = "base", ema_rate: float = 0.01, sync_steps: int = 1, ema_rank: int = 0):
        if kind not in KINDS:
            raise ValueError(f"teacher kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 < ema_rate <= 1.0:
            raise ValueError(f"ema_rate must be in (0, 1], got {ema_rate}")
        if sync_steps < 1:
            raise ValueError(f"sync_steps must be >= 1, got {sync_steps}")
        self.kind, self.ema_rate, self.sync_steps, self.ema_rank = kind, ema_rate, sync_steps, ema_rank
        self.peft = is_peft_model(model)
        self.copy = None          # full fine-tuning: frozen copy of the student
        self.deltas = {}          # LoRA with ema, ema_rank 0: name -> teacher's Delta W (float32)
        self.factors = {}         # LoRA with ema, ema_rank > 0: name -> (up [out, k], down [k, in]), Delta W = up @ down
        self.truncation_error = 0.0  # largest relative Frobenius error of the last low-rank update
        if kind == "live":
            return
        if self.peft:
            check_adapter_for_teacher(model, kind)
            if kind in ("ema", "initial"):
                # The teacher starts at the student's current effective update (zero for a fresh adapter; a
                # loaded round-1 adapter's update, or a PiSSA/OLoRA residual's complement, otherwise).
                layers = lora_layers(model)
                with full_parameters(model, lora_adapter_parameters(layers)):
                    if ema_rank:
                        self.factors = {name: current_factors(m) for name, m in layers.items()}
                    else:
                        self.deltas = {name: lora_delta(m).clone() for name, m in layers.items()}
        else:
            if ema_rank:
                raise ValueError("teacher_ema_rank applies to LoRA adapters; a fully fine-tuned model's teacher is a full copy")
            if is_zero3_partitioned(model.parameters()):
                raise ValueError(
                    f"teacher_model_kind: {kind} with full fine-tuning keeps a full frozen copy of the model, which DeepSpeed "
                    "ZeRO-3 cannot partition: train a LoRA adapter (the base teacher is then the model with the "
                    "adapter disabled, the EMA teacher an adapter-sized delta), use teacher_model_kind: live, or ZeRO-2"
                )
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    @contextmanager
    def scoring(self, model):
        """Yields the module whose forward is the teacher's (run it under torch.no_grad())."""
        if self.kind == "live":
            was_training = model.training
            model.eval()  # the same input scores the same way twice: no dropout
            try:
                yield model
            finally:
                model.train(was_training)
            return
        if self.copy is not None:
            yield self.copy
            return
        with ExitStack() as stack:
            stack.enter_context(model.disable_adapter())
            was_training = model.training
            model.eval()  # no LoRA dropout, no gradient checkpointing recompute for a no-grad forward
            stack.callback(model.train, was_training)
            if self.deltas or self.factors:
                layers = lora_layers_any(model)
                for name, delta in self.deltas.items():
                    hook = layers[name].register_forward_hook(_add_delta(delta))
                    stack.callback(hook.remove)
                for name, (up, down) in self.factors.items():
                    hook = layers[name].register_forward_hook(_add_low_rank(up, down))
                    stack.callback(hook.remove)
            yield model

    @torch.no_grad()
    def step(self, model, global_step: int) -> None:
        """Called after every optimizer step: the EMA update, on every `sync_steps`-th step (TRL's rule)."""
        if self.kind != "ema" or global_step % self.sync_steps:
            return
        rate = self.ema_rate
        if self.copy is not None:
            self._update_copy(model, rate)
            return
        layers = lora_layers_any(model)
        with full_parameters(model, lora_adapter_parameters(layers)):
            for name, delta in self.deltas.items():
                delta.lerp_(lora_delta(layers[name]).to(delta.device), rate)
            errors = [0.0]
            for name, (up, down) in list(self.factors.items()):
                new_up, new_down = lora_factors(layers[name])
                up, down, error = low_rank_ema(up, down, new_up.to(up.device), new_down.to(down.device), rate, self.ema_rank)
                self.factors[name] = (up, down)
                errors.append(error)
            self.truncation_error = max(errors)

    def _update_copy(self, model, rate: float) -> None:
        teacher_params = dict(self.copy.named_parameters())
        with full_parameters(model):
            student_params = {unwrapped_name(name): p for name, p in model.named_parameters()}
            if student_params.keys() != teacher_params.keys():
                missing = sorted(teacher_params.keys() - student_params.keys())[:3]
                raise RuntimeError(
                    f"the student's parameters do not match the teacher copy's (missing e.g. {missing}); under FSDP "
                    "set fsdp_use_orig_params: true so that the original parameters stay visible"
                )
            for name, teacher_param in teacher_params.items():
                student_value = full_value(student_params[name].detach())
                if student_value.shape != teacher_param.shape:
                    # FSDP1: the root unit's parameters stay sharded once its wrapper is unwrapped away.
                    raise RuntimeError(
                        f"the student's {name} is sharded ({tuple(student_value.shape)} instead of "
                        f"{tuple(teacher_param.shape)}) and cannot be gathered here: with FSDP use fsdp_version: 2, "
                        "or train a LoRA adapter"
                    )
                teacher_param.lerp_(student_value.to(teacher_param.device, teacher_param.dtype), rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.copy is not None and self.kind == "ema":
            return {f"copy.{k}": v for k, v in self.copy.state_dict().items()}
        state = {f"delta.{k}": v for k, v in self.deltas.items()}
        for name, (up, down) in self.factors.items():
            state[f"up.{name}"], state[f"down.{name}"] = up, down
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`'s output; a state saved for another teacher (kind, rank, layers) is refused."""
        for name in self.deltas:
            if f"delta.{name}" not in state:
                raise ValueError(f"the teacher state has no dense delta for {name}: was it saved with teacher_ema_rank > 0?")
        for name in self.factors:
            if f"up.{name}" not in state:
                raise ValueError(f"the teacher state has no low-rank factors for {name}: was it saved with teacher_ema_rank 0?")
        own = self.state_dict()
        unexpected = sorted(state.keys() - own.keys())
        if unexpected:
            raise ValueError(f"the teacher state holds {len(state)} tensors (e.g. {unexpected[0]}) where this {self.kind} "
                             f"teacher keeps {len(own)}: was it saved with another teacher_model_kind, "
                             "or set of LoRA layers?")
        if self.copy is not None and self.kind == "ema":
            self.copy.load_state_dict({k[len("copy."):]: v for k, v in state.items()})
        for name, delta in self.deltas.items():
            delta.copy_(state[f"delta.{name}"])
        for name, (up, down) in self.factors.items():
            self.factors[name] = (state[f"up.{name}"].to(up.device, up.dtype), state[f"down.{name}"].to(down.device, down.dtype))


def check_adapter_for_teacher(model, kind: str) -> None:
    """Refuse the PEFT setups whose teacher would silently differ from what `kind` promises."""
    follows_student = kind in ("ema", "initial")
    for name, config in model.peft_config.items():
        init = str(getattr(config, "init_lora_weights", "")).lower()
        if kind == "base" and init.startswith(RESIDUAL_INITS):
            raise ValueError(
                f"teacher_model_kind: base with init_lora_weights={init!r} (adapter {name!r}): that initialisation rewrites the "
                "base weights, so the model without the adapter is not the model training started from; use "
                "teacher_model_kind: initial (the step-0 student, frozen) or ema"
            )
        if follows_student and getattr(config, "use_dora", False):
            raise ValueError(
                f"teacher_model_kind: {kind} with DoRA (use_dora, adapter "
                f"{name!r}) is not supported: the teacher follows LoRA's B @ A update, and DoRA also rescales each "
                "weight's magnitude; use teacher_model_kind: base or live"
            )
        if follows_student and getattr(config, "modules_to_save", None):
            raise ValueError(
                f"teacher_model_kind: {kind} with modules_to_save={list(config.modules_to_save)} (adapter {name!r}) is not "
                "supported: the teacher follows the LoRA layers only, so those fully trained modules would stay at "
                "their base weights in the teacher; use teacher_model_kind: base or live, or leave them out of modules_to_save"
            )


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) that the model's forward projects hidden states with right now: with lm_head in
    PEFT's modules_to_save, the trained copy, or the original while the adapter is disabled. Read it inside
    the teacher's `scoring()` block, not after it."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    head = model.get_output_embeddings()
    if isinstance(head, LoraLayer):
        raise ValueError(
            "LoRA on lm_head (lm_head in lora_target_modules / target_modules) is not supported: the loss projects "
            "hidden states with the head's weight, which would leave the LoRA untrained; put lm_head in "
            "modules_to_save (lora_modules_to_save) or leave it out"
        )
    if isinstance(head, ModulesToSaveWrapper):
        head = head.original_module if head.disable_adapters or not head.active_adapters else \
            head.modules_to_save[head.active_adapters[0]]
    return head.weight, head.bias


def lora_layers_any(model) -> dict[str, torch.nn.Module]:
    # Same names as `lora_layers`, also while the adapter is disabled (and once FSDP has wrapped the layers).
    from peft.tuners.lora import LoraLayer

    return {unwrapped_name(name): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_factors(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale * B, A) of a LoRA layer's active adapter in float32: Delta W = scale * B @ A ([out, in], also for
    fan_in_fan_out layers: lora_B / lora_A are nn.Linear either way), never formed."""
    adapter = module.active_adapters[0]
    up = full_value(module.lora_B[adapter].weight).detach().float() * module.scaling[adapter]
    return up, full_value(module.lora_A[adapter].weight).detach().float()


def current_factors(module) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's current update as factors; rank 0 while it is zero (a fresh adapter), so no rank is spent on it."""
    up, down = lora_factors(module)
    if not up.any() or not down.any():
        return empty_factors(module)
    return up.clone(), down.clone()


def empty_factors(module) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-0 factors (Delta W = 0) shaped for `module`."""
    up, down = lora_factors(module)
    return up.new_zeros(up.shape[0], 0), down.new_zeros(0, down.shape[1])


@torch.no_grad()
def low_rank_ema(up, down, new_up, new_down, rate: float, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors of (1 - rate) up @ down + rate new_up @ new_down, truncated to `rank`, and the relative error.

    The sum is held in factored form ([out, k + r] @ [k + r, in]); above `rank` it is recompressed through
    QR of both factors and an SVD of the small [k + r, k + r] core (cost O((out + in) (k + r)^2), no
    [out, in] matrix). The error is ||dropped|| / ||sum|| in the Frobenius norm: exactly 0 while
    k + r <= rank.
    """
    if rate == 1.0:  # hard sync: the student's own rank-r update
        return new_up.clone(), new_down.clone(), 0.0
    up = torch.cat([up * (1.0 - rate), new_up * rate], dim=1)
    down = torch.cat([down, new_down], dim=0)
    if up.shape[1] <= rank:
        return up, down, 0.0
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, singular, vh = torch.linalg.svd(r_up @ r_down.T)
    total = singular.square().sum().sqrt().item()
    dropped = singular[rank:].square().sum().sqrt().item()
    up = q_up @ (u[:, :rank] * singular[:rank])
    down = (q_down @ vh[:rank].T).T.contiguous()
    return up, down, dropped / total if total > 0 else 0.0


def _add_low_rank(up: torch.Tensor, down: torch.Tensor):
    def hook(module, inputs, output):
        return output + F.linear(F.linear(inputs[0].to(up.dtype), down), up).to(output.dtype)

    return hook


def _add_delta(delta: torch.Tensor):
    def hook(module, inputs, output):
        return output + F.linear(inputs[0].to(delta.dtype), delta).to(output.dtype)

    return hook
