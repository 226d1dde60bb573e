"""Architecture numbers of a Qwen3 / Qwen3.5-style decoder and its parameter counts, for the memory planner.

A shape comes from an inline `model_config:`, a local model directory's config.json or the built-in table of
hub names (so a config can be planned on a machine that has no copy of the model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the planner needs (text trunk of a Qwen3 / Qwen3.5-style decoder)."""

    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    full_attention_layers: int
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    attn_output_gate: bool = False
    tie_word_embeddings: bool = False

    @property
    def linear_attention_layers(self) -> int:
        return self.num_layers - self.full_attention_layers

    @property
    def query_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "model") -> ModelShape:
        """From a transformers config dict (config.json; a multimodal config's `text_config` is used)."""
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"]
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        layers = config["num_hidden_layers"]
        layer_types = config.get("layer_types")
        if layer_types:
            full_layers = sum(1 for t in layer_types if t != "linear_attention")
        elif config.get("full_attention_interval"):
            full_layers = layers // int(config["full_attention_interval"])
        else:
            full_layers = layers
        model_type = str(config.get("model_type", ""))
        return cls(
            name=name,
            hidden_size=hidden,
            num_layers=layers,
            vocab_size=config["vocab_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            full_attention_layers=full_layers,
            linear_num_key_heads=config.get("linear_num_key_heads", 0) or 0,
            linear_num_value_heads=config.get("linear_num_value_heads", 0) or 0,
            linear_key_head_dim=config.get("linear_key_head_dim", 0) or 0,
            linear_value_head_dim=config.get("linear_value_head_dim", 0) or 0,
            linear_conv_kernel_dim=config.get("linear_conv_kernel_dim", 4) or 4,
            attn_output_gate=bool(config.get("attn_output_gate", model_type.startswith("qwen3_5"))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


QWEN3_5_9B = ModelShape(
    name="Qwen3.5-9B (text trunk)", hidden_size=4096, num_layers=32, vocab_size=248320, intermediate_size=12288,
    num_attention_heads=16, num_key_value_heads=4, head_dim=256, full_attention_layers=8,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, attn_output_gate=True, tie_word_embeddings=False,
)
QWEN3_8B = ModelShape(
    name="Qwen3-8B", hidden_size=4096, num_layers=36, vocab_size=151936, intermediate_size=12288,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, full_attention_layers=36, tie_word_embeddings=False,
)
QWEN3_4B = ModelShape(
    name="Qwen3-4B", hidden_size=2560, num_layers=36, vocab_size=151936, intermediate_size=9728,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, full_attention_layers=36, tie_word_embeddings=True,
)
# Lower-cased hub names (any owner) -> shape, for configs whose model is not on this machine.
KNOWN_SHAPES = {
    "qwen3.5-9b": QWEN3_5_9B,
    "qwen3.5-9b-base": QWEN3_5_9B,
    "qwen3-8b": QWEN3_8B,
    "qwen3-8b-base": QWEN3_8B,
    "qwen3-4b": QWEN3_4B,
    "qwen3-4b-base": QWEN3_4B,
    "qwen3-4b-instruct-2507": QWEN3_4B,
}


def resolve_shape(cfg: dict) -> ModelShape:
    """`model_config:` inline dict > local `base_model` directory with config.json > the built-in table."""
    base_model = str(cfg.get("base_model") or "")
    if cfg.get("model_config"):
        return ModelShape.from_hf_config(dict(cfg["model_config"]), name=base_model or "model_config")
    config_path = os.path.join(base_model, "config.json")
    if base_model and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            return ModelShape.from_hf_config(json.load(handle), name=base_model)
    key = base_model.rstrip("/").split("/")[-1].lower()
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    raise ValueError(
        f"unknown model {base_model!r}: give a local base_model directory with config.json, a `model_config:` "
        f"block with the architecture (hidden_size, num_hidden_layers, ...), or one of {sorted(KNOWN_SHAPES)}"
    )


# ------------------------------------------------------------------------------------------- parameters
def linear_modules(shape: ModelShape) -> list[tuple[str, int, int, int]]:
    """Every decoder linear layer as (name, in_features, out_features, how many in the model)."""
    full, linear, layers = shape.full_attention_layers, shape.linear_attention_layers, shape.num_layers
    hidden, inter = shape.hidden_size, shape.intermediate_size
    query_out = shape.query_dim * (2 if shape.attn_output_gate else 1)
    modules = [
        ("q_proj", hidden, query_out, full),
        ("k_proj", hidden, shape.kv_dim, full),
        ("v_proj", hidden, shape.kv_dim, full),
        ("o_proj", shape.query_dim, hidden, full),
        ("gate_proj", hidden, inter, layers),
        ("up_proj", hidden, inter, layers),
        ("down_proj", inter, hidden, layers),
    ]
    if linear:
        modules += [
            ("in_proj_qkv", hidden, shape.linear_conv_dim, linear),
            ("in_proj_z", hidden, shape.linear_value_dim, linear),
            ("in_proj_b", hidden, shape.linear_num_value_heads, linear),
            ("in_proj_a", hidden, shape.linear_num_value_heads, linear),
            ("out_proj", shape.linear_value_dim, hidden, linear),
        ]
    return [m for m in modules if m[3] > 0]


def other_parameters(shape: ModelShape) -> int:
    """Parameters outside the decoder linears: embeddings, lm_head, norms, convolutions, gates' scalars."""
    embeddings = shape.vocab_size * shape.hidden_size
    lm_head = 0 if shape.tie_word_embeddings else embeddings
    norms = 2 * shape.hidden_size * shape.num_layers + shape.hidden_size
    norms += 2 * shape.head_dim * shape.full_attention_layers  # q_norm, k_norm
    linear = shape.linear_attention_layers * (
        shape.linear_conv_dim * shape.linear_conv_kernel_dim  # depthwise conv1d
        + 2 * shape.linear_num_value_heads  # dt_bias, A_log
        + shape.linear_value_head_dim  # gated RMSNorm
    )
    return embeddings + lm_head + norms + linear


def count_parameters(shape: ModelShape) -> int:
    return sum(i * o * n for _, i, o, n in linear_modules(shape)) + other_parameters(shape)


def lora_parameters(shape: ModelShape, targets: list[str], rank: int) -> int:
    return sum(rank * (i + o) * n for name, i, o, n in linear_modules(shape) if name in targets)
