"""Attention for packed rows on a GPU: flash attention over each example's own tokens (PyTorch's varlen kernel).

A packed row holds a micro-batch's examples back to back. Through SDPA it needs a block-diagonal mask over the whole
row, and the kernels that take a mask compute every query against every key of the row, then mask most of it away:
for 8 examples that is ~8x the work of attending within each example, and it grows with the row. The varlen kernel
takes the examples' boundaries instead (trl's padding-free collator passes them as ``cu_seq_lens_q``) and computes
each example's causal square only, with no mask in memory.
"""

import inspect

import torch
from transformers import AttentionInterface

from redistill.errors import PipelineError

PACKED_ATTENTION = "redistill_packed"

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # PyTorch before 2.10
    varlen_attn = None

# The kernel's keywords changed between releases: causality became a window (2.11), grouped-query heads came in 2.12.
_KEYWORDS = set(inspect.signature(varlen_attn).parameters) if varlen_attn else set()
_CAUSAL = {"window_size": (-1, 0)} if "window_size" in _KEYWORDS else {"is_causal": True}


def packed_attention_available(dtype: torch.dtype) -> bool:
    """Whether this machine runs the varlen kernel: a CUDA GPU, PyTorch >= 2.10 and half-precision activations."""
    return varlen_attn is not None and torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16)


def use_packed_attention(model) -> None:
    """Switch ``model``'s attention layers to the varlen kernel (every batch it sees must be padding-free)."""
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    model.set_attn_implementation(PACKED_ATTENTION)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: ``query`` is (1, heads, tokens, head_dim), ``key`` and ``value``
    (1, kv_heads, tokens, head_dim), one packed row whose examples start at ``cu_seq_lens_q``; returns the output as
    (1, tokens, heads, head_dim), causal within each example."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise PipelineError("packed attention needs padding-free batches (train.packing: true); please report this")
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise PipelineError(
            f"{type(module).__name__}: attention dropout, sliding windows and soft-capping are not supported with "
            "train.packing on a GPU; set train.packing: false"
        )
    query, key, value = (states[0].transpose(0, 1) for states in (query, key, value))  # (tokens, heads, head_dim)
    options = dict(_CAUSAL)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves several query heads
        if "enable_gqa" in _KEYWORDS:
            options["enable_gqa"] = True
        else:
            key, value = (states.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for states in (key, value))
    if "scale" in _KEYWORDS:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-6:
        raise PipelineError("this PyTorch's varlen attention has no scale; upgrade PyTorch or set train.packing: false")
    lengths = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    output = varlen_attn(query, key, value, lengths, lengths, max_length_q, max_length_q, **options)
    return output.unsqueeze(0), None
