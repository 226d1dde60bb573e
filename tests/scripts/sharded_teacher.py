"""The EMA teacher on a sharded student (CPU, gloo), run under torchrun by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/scripts/sharded_teacher.py OUTPUT_DIR fsdp2 [fsdp2-full fsdp1 ...]

Builds the tiny Qwen3 twice with the same seed: a reference that stays whole, and a student that is
sharded across the processes (FSDP2 `fully_shard` per decoder layer and at the root, or FSDP1
`FullyShardedDataParallel` with use_orig_params). Both get the same LoRA weights (B non-zero, so the
adapters matter) and a `Teacher("ema")` made before sharding, as the trainer does. Then both take two
teacher updates, the student's trainable weights changing in between. "-full" is full fine-tuning (the
teacher is an EMA copy of the model). Writes OUTPUT_DIR/{KIND}_rank{R}.pt for every KIND: the teacher
deltas (LoRA) or the EMA copy (full) of the reference and of the sharded student, and with FSDP2 the
hidden states the teacher scores with, for both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
TINY_MODEL = REPO / "example_configs" / "assets" / "tiny-qwen3"


def build(lora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    if lora:
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model


def change_trainable(model, seed: int, fsdp1_root=None) -> None:
    """Move every trainable weight (a stand-in for an optimizer step), the same way sharded or not."""
    from sd_plugin.teacher import is_dtensor, unwrapped_name

    if fsdp1_root is not None:  # FSDP1: change the full parameters and write the shards back
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(fsdp1_root, writeback=True):
            return change_trainable(model, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            full_shape = param.full_tensor().shape if is_dtensor(param) else param.shape
            step = torch.randn(full_shape, generator=torch.Generator().manual_seed(seed + len(unwrapped_name(name)))) * 0.01
            if is_dtensor(param):
                from torch.distributed.tensor import distribute_tensor

                step = distribute_tensor(step, param.device_mesh, param.placements)
            param.add_(step)


def shard(model, kind: str):
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Qwen3DecoderLayer}), use_orig_params=True,
                                    device_id=torch.device("cpu"))


def teacher_hidden(teacher, model, ids):
    with torch.no_grad(), teacher.scoring(model) as scorer:
        return scorer(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def run(output_dir: Path, kind: str, rank: int) -> None:
    from sd_plugin.teacher import Teacher

    lora = not kind.endswith("-full")
    sharding = kind.removesuffix("-full")
    reference, student = build(lora), build(lora)
    reference_teacher = Teacher(reference, "ema", ema_rate=0.5)
    student_teacher = Teacher(student, "ema", ema_rate=0.5)  # made before sharding, as in the trainer
    wrapped = shard(student, sharding)
    unwrapped = wrapped.module if sharding == "fsdp1" else wrapped  # what accelerator.unwrap_model returns
    for update in (1, 2):
        change_trainable(reference, seed=100 * update)
        change_trainable(unwrapped, seed=100 * update, fsdp1_root=wrapped if sharding == "fsdp1" else None)
        reference_teacher.step(reference, update)
        student_teacher.step(unwrapped, update)
    result = {"reference": reference_teacher.state_dict(), "sharded": student_teacher.state_dict()}
    if sharding == "fsdp2":  # FSDP2 shards the modules in place: the unwrapped model still runs its own forward
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        result["reference_hidden"] = teacher_hidden(reference_teacher, reference, ids)
        result["sharded_hidden"] = teacher_hidden(student_teacher, unwrapped, ids)
    torch.save(result, output_dir / f"{kind}_rank{rank}.pt")


def main() -> None:
    output_dir, kinds = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for kind in kinds:
        run(output_dir, kind, dist.get_rank())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
