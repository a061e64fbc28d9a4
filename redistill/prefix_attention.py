"""Cascade attention for the decoding step: the shared prefix read once for all rows, not once per row.

Every row of a static batch holds the same prefix (the system turn) in its first columns of the KV cache, and a
decoding step's attention (one query token per row) otherwise reads those columns again for every row: on an 8B
model at a batch of 1024, about a third of the cache it reads each step. Here all rows' queries meet the prefix's
keys and values of one row, as one dense matrix product per key/value head, and each row's queries meet only its
own columns after the prefix; one softmax over both parts' scores (float32, the mask added) weighs them. The result
is attention over the whole row, as SDPA computes it, up to rounding.

`attending_once_to_shared_prefix` switches a model's attention to this function for a forward pass; the prefix's
length reaches it through the forward's keyword ``shared_prefix``. Anything but one query token per row (a
prefill), or no prefix, runs transformers' SDPA as before.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

# transformers checks implementation names for "sdpa", "flash" and "flex": this one must hold none of them
SHARED_PREFIX_ATTENTION = "redistill_shared_prefix"


@contextmanager
def attending_once_to_shared_prefix(model) -> Iterator[None]:
    """``model``'s attention is `shared_prefix_attention` inside the block (a CUDA graph captured there keeps it);
    its own implementation comes back after, for prefills and whatever else uses the model."""
    own = model.config._attn_implementation
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    # a 2D padding mask becomes SDPA's 4D mask, as under the model's own SDPA (a 4D mask is passed as it is)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SHARED_PREFIX_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prefix: int = 0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: ``query`` is (rows, heads, 1, head_dim), ``key`` and ``value``
    (rows, kv_heads, columns, head_dim), every row's first ``shared_prefix`` columns the same; ``attention_mask``
    (rows, 1, 1, columns) is added to the scores. Returns the output as (rows, 1, heads, head_dim)."""
    if query.shape[2] != 1 or not shared_prefix:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads, prefix = key.shape[1], shared_prefix
    group = heads // kv_heads  # the query heads that share a key/value head
    scaling = dim**-0.5 if scaling is None else scaling
    queries = query.reshape(rows * kv_heads, group, dim)  # each row's and key/value head's query heads
    # the prefix: every row's queries of one key/value head against row 0's prefix, one product per head
    by_head = queries.view(rows, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads, rows * group, dim)
    prefix_scores = float32_product(by_head, key[0, :, :prefix].transpose(1, 2))
    # the rest: each row's queries against its own columns
    own_keys = key[:, :, prefix:].flatten(0, 1).transpose(1, 2)
    own_scores = float32_product(queries, own_keys).view(rows, kv_heads, group, -1)
    prefix_scores = prefix_scores.view(kv_heads, rows, group, prefix).transpose(0, 1)
    scores = torch.cat([prefix_scores, own_scores], -1)
    # scaled and masked in one pass over the scores
    scores = scores * scaling if attention_mask is None else torch.add(attention_mask, scores, alpha=scaling)
    weights = scores.softmax(-1).to(value.dtype)
    prefix_weights = weights[..., :prefix].transpose(0, 1).reshape(kv_heads, rows * group, prefix)
    prefix_output = float32_product(prefix_weights, value[0, :, :prefix]).view(kv_heads, rows, group, dim)
    own_weights = weights[..., prefix:].flatten(0, 1)
    own_output = float32_product(own_weights, value[:, :, prefix:].flatten(0, 1)).view(rows, kv_heads, group, dim)
    output = (prefix_output.transpose(0, 1) + own_output).to(query.dtype)
    return output.reshape(rows, 1, heads, dim), None


def float32_product(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The batched product ``first @ second`` in float32. On a GPU a half-precision product accumulates in float32
    anyway and writes it so, without copying its operands (the keys and values) to float32; elsewhere they are."""
    if first.is_cuda and first.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(first, second, out_dtype=torch.float32)
    return torch.bmm(first.float(), second.float())
