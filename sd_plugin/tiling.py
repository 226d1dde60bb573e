"""Sequence tiling on one GPU: each decoder layer runs over the sequence in tiles, so activation memory
scales with the tile, not with the sequence length ("context parallel in time").

`tiled_decoder(decoder, tile_size, keep=...)` swaps the decoder's forward (Qwen3 / Qwen3.5 text trunks) for
one that runs layer by layer, tile by tile, around the model's own modules:

- Gated DeltaNet (linear-attention) tiles carry the recurrent state and the last (conv_kernel - 1)
  pre-convolution columns to the next tile; the whole layer (norms, projections, convolution, delta rule,
  gated norm, MLP) of one tile is one checkpoint, so backward recomputes one tile at a time.
- Full-attention layers first compute each tile's K/V (one checkpoint per tile; K/V of the whole
  sequence stay, like a KV cache), then each query tile runs projections, gate, an SDPA core over the K/V of
  itself and the earlier tiles (causal, padding keys masked), o_proj and the MLP as one checkpoint. The K/V
  heads are repeated to the query heads so that CUDA's memory-efficient kernel takes the masked call (never
  the math kernel: `fused_attention_kernel`).
- Only the positions in `keep` (the completion slice) get the final norm; they are returned as a copy.

Under `torch.no_grad()` (the teacher) the same code is a chunked prefill: nothing is checkpointed and only the
kept positions' hidden states leave the decoder. Between layers the full [B, T, H] hidden state is kept
(the checkpoint boundary); `offload=True` keeps it in CPU memory instead and copies each tile back when needed.

Plain PyTorch: single process or data parallel (DDP). FSDP / ZeRO-3 shard whole layers and would not see
these calls.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Decoder classes whose layers this module knows (their forward is re-implemented tile by tile here).
SUPPORTED_DECODERS = ("Qwen3Model", "Qwen3_5TextModel")


def check_supported(decoder, key: str = "sequence_tile_size") -> None:
    """Refuse decoders whose layers this module does not re-implement (the message names the option)."""
    name = type(decoder).__name__
    if name not in SUPPORTED_DECODERS:
        raise ValueError(f"{key} supports the text decoders {', '.join(SUPPORTED_DECODERS)} (Qwen3, Qwen3.5); "
                         f"this model's decoder is {name}: set {key}: 0")
    for index, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and getattr(attn, "sliding_window", None):
            raise ValueError(f"{key}: layer {index} uses sliding-window attention, which tiling does not implement; "
                             f"set {key}: 0")
        if not (hasattr(layer, "linear_attn") or attn is not None):
            raise ValueError(f"{key}: layer {index} of {name} is neither attention nor Gated DeltaNet; set {key}: 0")


@contextlib.contextmanager
def tiled_decoder(decoder, tile_size: int, *, keep: slice, offload: bool = False):
    """Within the block, `decoder(...)` runs tiled and returns `last_hidden_state` at positions `keep` only.

    The model's own forward (and any DDP wrapper around it) still makes the call; only the decoder's forward
    is replaced, for this block.
    """
    if tile_size < 1:
        raise ValueError(f"sequence_tile_size must be >= 1 here, got {tile_size}")
    check_supported(decoder)

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("sequence_tile_size: the tiled forward does not fill a KV cache (use_cache must be False)")
        hidden = tiled_hidden_states(decoder, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                     attention_mask=attention_mask, position_ids=position_ids,
                                     tile_size=tile_size, keep=keep, offload=offload)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    decoder.forward = forward
    try:
        yield decoder
    finally:
        del decoder.forward  # back to the class's forward


def tiled_hidden_states(decoder, *, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                        tile_size: int, keep: slice, offload: bool = False) -> torch.Tensor:
    """Final-normed hidden states [B, len(keep), H] of a Qwen3 / Qwen3.5 text decoder, computed in sequence tiles."""
    hidden = decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    batch, length, _ = hidden.shape
    device = hidden.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if attention_mask.ndim != 2:
        raise ValueError("sequence_tile_size: needs a 2D padding mask [batch, length]")
    if position_ids is None:
        position_ids = torch.arange(length, device=device).expand(batch, -1)
    if position_ids.ndim == 3:  # Qwen3.5 multimodal rope ids: [4, B, T] (text row first) or [3, B, T]
        position_ids = position_ids[1:] if position_ids.shape[0] == 4 else position_ids
    mask = attention_mask.bool()
    tiles = [(start, min(start + tile_size, length)) for start in range(0, length, tile_size)]
    grad = torch.is_grad_enabled()
    run = (lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)) if grad else (lambda fn, *args: fn(*args))

    def tile_of(tensor, start, end):
        # A tile of a layer input, copied to the device INSIDE each checkpoint (`on_device`), so that with
        # offload the checkpoint keeps the host slice, not a device copy.
        return tensor[:, start:end]

    def on_device(h):
        return h.to(device)

    like = torch.empty(0, dtype=hidden.dtype, device=device)  # rotary tables: dtype and device of the compute
    if offload:
        hidden = hidden.to("cpu")

    for layer in decoder.layers[: decoder.config.num_hidden_layers]:
        outputs = []
        if hasattr(layer, "linear_attn"):
            gdn = layer.linear_attn
            conv_tail = torch.zeros(batch, gdn.conv_dim, gdn.conv_kernel_size - 1, dtype=hidden.dtype, device=device)
            state = None
            for start, end in tiles:
                out, conv_tail, state = run(
                    lambda h, m, tail, s, layer=layer: delta_net_tile(layer, on_device(h), m, tail, s),
                    tile_of(hidden, start, end), mask[:, start:end], conv_tail, state)
                outputs.append(out.to("cpu") if offload else out)
        else:
            keys, values = [], []
            for start, end in tiles:
                cos_sin = decoder.rotary_emb(like, position_ids[..., start:end])
                k, v = run(lambda h, cos, sin, layer=layer: attention_kv_tile(layer, on_device(h), (cos, sin)),
                           tile_of(hidden, start, end), *cos_sin)
                keys.append(k)
                values.append(v)
            keys, values = torch.cat(keys, dim=2), torch.cat(values, dim=2)
            for start, end in tiles:
                cos_sin = decoder.rotary_emb(like, position_ids[..., start:end])
                # The [tile, end] mask is built inside the checkpoint: kept for backward it would cost T^2 / 2 bytes.
                out = run(lambda h, cos, sin, k, v, start=start, layer=layer:
                          attention_tile(layer, on_device(h), (cos, sin), k, v,
                                         tile_attention_mask(mask, start, start + h.shape[1])),
                          tile_of(hidden, start, end), *cos_sin, keys[:, :, :end], values[:, :, :end])
                outputs.append(out.to("cpu") if offload else out)
            del keys, values
        hidden = torch.cat(outputs, dim=1)
    # Final norm on the kept positions only; a copy, so no [B, T, H] storage outlives this call.
    return decoder.norm(hidden[:, keep].to(device)).clone()


def tile_attention_mask(mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[B, 1, tile, end] bool: query i sees real keys j <= i (and itself, so padded rows are never all-masked)."""
    device = mask.device
    query = torch.arange(start, end, device=device)[:, None]
    key = torch.arange(end, device=device)[None, :]
    causal = key <= query
    return ((causal & mask[:, None, :end]) | (key == query)).unsqueeze(1)


def expand_kv_heads(keys: torch.Tensor, values: torch.Tensor, query_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [B, kv_heads, S, D] repeated to the query heads (query head h reads K/V head h // groups, as SDPA's
    enable_gqa and transformers' repeat_kv).

    Why: on CUDA the flash kernel takes grouped heads but no attention mask, and the memory-efficient kernel
    takes a mask but not grouped heads; a masked grouped call gets PyTorch's math kernel, which materialises
    the [heads, tile, S] scores (8 GiB in bf16 per call at 64K). The copies live inside the tile's checkpoint
    (2 x [B, heads, S, D], and their gradients in backward): what the planner counts (memory_terms.tiled_terms).
    """
    groups = query_heads // keys.shape[1]
    if groups == 1:
        return keys, values
    return keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)


@contextlib.contextmanager
def fused_attention_kernel(query: torch.Tensor):
    """On CUDA, SDPA restricted to the memory-efficient kernel (it takes the tile's boolean mask): never the math
    kernel, whose [heads, tile, S] scores the planner does not count. A call it refuses fails loudly, naming the
    option. Elsewhere (CPU) SDPA picks its own kernel."""
    if not query.is_cuda:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        try:
            yield
        except RuntimeError as error:
            if "No available kernel" not in str(error):
                raise
            raise RuntimeError(
                f"sequence_tile_size: PyTorch's memory-efficient attention kernel refused the tiled attention call "
                f"({query.dtype}, head_dim {query.shape[-1]}; see the warnings above for why), and the math kernel would "
                "materialise [heads, tile, length] scores; set sequence_tile_size: 0") from error


def _modeling(module):
    return sys.modules[type(module).__module__]


def _mlp_block(layer, hidden: torch.Tensor) -> torch.Tensor:
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def delta_net_tile(layer, hidden, mask, conv_tail, state):
    """One Gated DeltaNet decoder layer over one tile: (output, next conv tail, next recurrent state).

    Follows the model's Qwen3_5GatedDeltaNet.forward, with the (conv_kernel - 1) pre-convolution columns of
    the previous tile prepended (zeros at the start = the model's causal padding) and the delta rule started
    from the previous tile's final state.
    """
    modeling = _modeling(layer.linear_attn)
    gdn = layer.linear_attn
    x = modeling.apply_mask_to_padding_states(layer.input_layernorm(hidden), mask)
    batch, length, _ = x.shape
    mixed_qkv = torch.cat([conv_tail, gdn.in_proj_qkv(x).transpose(1, 2)], dim=-1)
    next_tail = mixed_qkv[:, :, mixed_qkv.shape[-1] - (gdn.conv_kernel_size - 1):]
    z = gdn.in_proj_z(x).reshape(batch, length, -1, gdn.head_v_dim)
    b, a = gdn.in_proj_b(x), gdn.in_proj_a(x)
    mixed_qkv = modeling.causal_conv1d_fn(mixed_qkv, gdn.conv1d.weight.squeeze(1), gdn.conv1d.bias,
                                          activation=gdn.activation)[:, :, -length:]
    query, key, value = torch.split(mixed_qkv.transpose(1, 2), [gdn.key_dim, gdn.key_dim, gdn.value_dim], dim=-1)
    query = query.reshape(batch, length, -1, gdn.head_k_dim)
    key = key.reshape(batch, length, -1, gdn.head_k_dim)
    value = value.reshape(batch, length, -1, gdn.head_v_dim)
    beta = b.sigmoid()
    g = -gdn.A_log.float().exp() * F.softplus(a.float() + gdn.dt_bias)
    if gdn.num_v_heads // gdn.num_k_heads > 1:
        query = query.repeat_interleave(gdn.num_v_heads // gdn.num_k_heads, dim=2)
        key = key.repeat_interleave(gdn.num_v_heads // gdn.num_k_heads, dim=2)
    core, next_state = modeling.torch_chunk_gated_delta_rule(
        query, key, value, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    core = gdn.norm(core.reshape(-1, gdn.head_v_dim), z.reshape(-1, gdn.head_v_dim)).reshape(batch, length, -1)
    hidden = hidden + gdn.out_proj(core)
    return _mlp_block(layer, hidden), next_tail, next_state


def attention_kv_tile(layer, hidden, position_embeddings):
    """Rotated keys and values [B, kv_heads, tile, head_dim] of one tile (the model's attention code)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    key = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    _, key = _modeling(attn).apply_rotary_pos_emb(key, key, cos, sin)
    return key, value


def attention_tile(layer, hidden, position_embeddings, keys, values, allowed):
    """One full-attention decoder layer over one query tile against the keys/values of positions [0, end)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    input_shape = x.shape[:-1]
    shape = (*input_shape, -1, attn.head_dim)
    projected = attn.q_proj(x)
    gate = None
    if projected.shape[-1] == 2 * attn.config.num_attention_heads * attn.head_dim:  # Qwen3.5: output gate
        query, gate = torch.chunk(projected.view(*input_shape, -1, attn.head_dim * 2), 2, dim=-1)
        gate = gate.reshape(*input_shape, -1)
    else:
        query = projected.view(shape)
    query = attn.q_norm(query.view(shape)).transpose(1, 2)
    cos, sin = position_embeddings
    query, _ = _modeling(attn).apply_rotary_pos_emb(query, query, cos, sin)
    keys, values = expand_kv_heads(keys.to(query.dtype), values.to(query.dtype), query.shape[1])
    with fused_attention_kernel(query):
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=attn.scaling,
                                             dropout_p=attn.attention_dropout if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(*input_shape, -1)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return _mlp_block(layer, hidden + attn.o_proj(out))
