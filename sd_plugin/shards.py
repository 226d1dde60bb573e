"""The shard plan of a merge: the base's safetensors headers, the output shards, the expected peak memory.

Nothing here loads a tensor: `plan_shards` reads headers only, so `--dry-run` can print what a merge would write
and how much memory it and its logits check would need.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd_plugin.hub import PublishError, format_size
from sd_plugin.merge_check import SAFETENSORS_FLOAT_DTYPES, num_layers, within_layers
from sd_plugin.merge_inputs import MergeRequest, ResolvedInputs, read_json

SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
VERIFY_LAYERS_WHEN_SHORT = 2  # the logits check's decoder layers when the whole float32 model does not fit
CHECK_OVERHEAD = 3            # peak of loading a model in float32 / its float32 size (benchmarks/bench_merge.py)


def parse_size(size: str | int) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(size)
    except ValueError as error:
        raise PublishError(f"--max-shard-size: {error}") from error


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: VmHWM on Linux (ru_maxrss there also counts the parent's
    memory when the process was started by fork + exec), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Entry:
    """One base tensor: where it is, what it becomes, and which output file it goes to."""

    shard: Path
    name: str
    kind: str          # safetensors dtype of the base tensor
    shape: tuple
    out_bytes: int
    out_file: int = 0


@dataclass
class ShardPlan:
    """The base's tensors in file order, assigned to output files of at most `max_shard_size` bytes."""

    entries: list
    files: list                      # output file names
    shard_bytes: dict = field(default_factory=dict)  # base shard -> bytes on disk
    float_parameters: int = 0

    def output_bytes(self) -> list[int]:
        sizes = [0] * len(self.files)
        for entry in self.entries:
            sizes[entry.out_file] += entry.out_bytes
        return sizes

    def expected_peak(self, adapter_bytes: int) -> tuple[int, str]:
        """Merge peak: the base shard being read (its pages are mapped) + the output shard being filled + three float32
        copies of the largest tensor (base, update, sum) + the adapter in float32."""
        largest_in = max(self.shard_bytes.values(), default=0)
        largest_out = max(self.output_bytes(), default=0)
        largest_tensor = max((math.prod(entry.shape) for entry in self.entries), default=0) * 4 * 3
        total = largest_in + largest_out + largest_tensor + 2 * adapter_bytes
        return total, (f"largest base shard {format_size(largest_in)} + largest output shard {format_size(largest_out)} + "
                       f"working tensors {format_size(largest_tensor)} + adapter {format_size(2 * adapter_bytes)}")


def base_shard_paths(base_dir: Path) -> list[Path]:
    """The base's safetensors files: those of its index, else model.safetensors, else every *.safetensors."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return [base_dir / name for name in dict.fromkeys(read_json(index)["weight_map"].values())]
    if (base_dir / "model.safetensors").is_file():
        return [base_dir / "model.safetensors"]
    return sorted(base_dir.glob("*.safetensors"))


def plan_shards(base_dir: Path | None, dtype: torch.dtype, max_shard_size, replaced: dict | None = None) -> ShardPlan | None:
    """Read the base's safetensors headers (nothing else) and lay out the output shards; None without local shards."""
    from safetensors import safe_open

    paths = base_shard_paths(base_dir) if base_dir is not None else []
    if not paths:
        return None
    limit, replaced = parse_size(max_shard_size), replaced or {}
    plan = ShardPlan(entries=[], files=[], shard_bytes={path: path.stat().st_size for path in paths})
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                kind, shape = view.get_dtype(), tuple(view.get_shape())
                if name in replaced:
                    shape = tuple(replaced[name].shape)
                floating = kind in SAFETENSORS_FLOAT_DTYPES
                plan.float_parameters += math.prod(shape) if floating else 0
                itemsize = dtype.itemsize if floating else SAFETENSORS_BYTES.get(kind, 1)
                plan.entries.append(Entry(path, name, kind, shape, math.prod(shape) * itemsize))
    file_index, filled = 0, 0
    for entry in plan.entries:
        if filled and filled + entry.out_bytes > limit:
            file_index, filled = file_index + 1, 0
        entry.out_file, filled = file_index, filled + entry.out_bytes
    count = file_index + 1
    plan.files = (["model.safetensors"] if count == 1 else
                  [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)])
    return plan


def adapter_weight_bytes(adapter_dir: Path) -> int:
    return sum((adapter_dir / name).stat().st_size for name in ("adapter_model.safetensors", "adapter_model.bin")
               if (adapter_dir / name).is_file())


def verification_plan(request: MergeRequest, inputs: ResolvedInputs, plan: ShardPlan | None) -> tuple[int | None, int, str]:
    """(decoder layers the logits check loads, None for all, 0 for none; its expected peak in bytes; why).

    Loading a float32 model through transformers peaks at about CHECK_OVERHEAD x its float32 size (bf16 copies and
    the conversion; measured by benchmarks/bench_merge.py). Without `request.verify_layers`: the whole model when
    that fits in the memory available, else the first 2 layers with the embeddings and head, else no check.
    """
    total_layers = num_layers(str(inputs.base_dir)) if inputs.base_dir is not None else None
    if request.verify_layers == 0:
        return 0, 0, "the logits check is off (--verify-layers 0)"
    if plan is None:
        return request.verify_layers, 0, "the logits check's memory is unknown: the base is not a local safetensors checkpoint"

    def float32_bytes(layers):
        return sum(4 * math.prod(entry.shape) for entry in plan.entries
                   if entry.kind in SAFETENSORS_FLOAT_DTYPES and within_layers(entry.name, layers))

    available = available_memory()
    layers = request.verify_layers
    if layers is None and available is not None and CHECK_OVERHEAD * float32_bytes(None) > available:
        layers = VERIFY_LAYERS_WHEN_SHORT
        if CHECK_OVERHEAD * float32_bytes(layers) > available:
            return 0, 0, (f"the logits check is skipped: even {layers} layers with the embeddings and head need "
                          f"~{format_size(CHECK_OVERHEAD * float32_bytes(layers))}, {format_size(available)} available "
                          "(--verify-layers N forces it)")
    if layers is not None and total_layers is not None and layers >= total_layers:
        layers = None
    needed = CHECK_OVERHEAD * float32_bytes(layers)
    if layers is None:
        return None, needed, f"the logits check loads the whole model in float32 (peak ~{format_size(needed)})"
    return layers, needed, (f"the logits check loads the first {layers} of {total_layers} decoder layers with the embeddings "
                            f"and head in float32 (peak ~{format_size(needed)}; the whole model would need "
                            f"~{format_size(CHECK_OVERHEAD * float32_bytes(None))}, {format_size(available)} available; "
                            "--verify-layers N to choose)")
