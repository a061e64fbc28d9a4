"""Cascade attention for the decoding step: the shared prefix read once for all rows, not once per row.

Every row of a static batch holds the same prefix (the system turn) in its first columns of the KV cache, and a
decoding step's attention (one query token per row) otherwise reads those columns again for every row: on an 8B
model at a batch of 1024, about a third of the cache it reads each step. Here all rows' queries meet the prefix's
keys and values of one row, as one dense matrix product per key/value head, and each row's queries meet only its
own columns after the prefix: on a GPU through FlexAttention's decoding kernel (the mask added inside it, the columns
split over the GPU's cores), elsewhere through batched matrix products. Each part returns its output and the
log-sum-exp of its scores (float32, the mask added), which weigh the two: attention over the whole row, as SDPA
computes it, up to rounding.

`attending_once_to_shared_prefix` switches a model's attention to this function for a forward pass; the prefix's
length reaches it through the forward's keyword ``shared_prefix``. Anything but one query token per row (a
prefill), or no prefix, runs transformers' SDPA as before.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

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
    (rows, 1, 1, columns) is added to the scores. Returns the output as (rows, 1, heads, head_dim).

    Each part's output comes with the log-sum-exp of its scores, and the two are weighed by them: the softmax over
    all columns, without a pass over the joined scores."""
    if query.shape[2] != 1 or not shared_prefix:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    prefix = shared_prefix
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = None if attention_mask is None else attention_mask[:, 0, 0]  # (rows, columns): the same for every head
    prefix_mask, own_mask = (None, None) if mask is None else (mask[:, :prefix], mask[:, prefix:])
    prefix_output, prefix_lse = prefix_part(query, key[0, :, :prefix], value[0, :, :prefix], scaling, prefix_mask)
    own_part = flex_own_part if query.is_cuda and OWN_PART_KERNEL == "flex" else plain_own_part
    own_output, own_lse = own_part(query, key[:, :, prefix:], value[:, :, prefix:], scaling, own_mask)
    top = torch.maximum(prefix_lse, own_lse)
    prefix_weight, own_weight = (torch.exp(lse - top)[..., None] for lse in (prefix_lse, own_lse))
    output = (prefix_weight * prefix_output + own_weight * own_output) / (prefix_weight + own_weight)
    return output.to(query.dtype).transpose(1, 2), None


def prefix_part(query, key, value, scaling: float, mask: torch.Tensor | None):
    """Every row's queries (rows, heads, 1, dim) against the prefix's keys and values (kv_heads, prefix, dim), as one
    matrix product per key/value head; ``mask`` (rows, prefix). The output (rows, heads, 1, dim) and log-sum-exp
    (rows, heads, 1), float32."""
    rows, heads, _, dim = query.shape
    kv_heads, prefix = key.shape[:2]
    group = heads // kv_heads  # the query heads that share a key/value head
    by_head = query.view(rows, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads, rows * group, dim)
    scores = float32_product(by_head, key.transpose(1, 2)).view(kv_heads, rows, group, prefix).transpose(0, 1)
    weights, lse = softmax_weights(scores, mask, scaling, value.dtype)
    weights = weights.transpose(0, 1).reshape(kv_heads, rows * group, prefix)
    output = float32_product(weights, value).view(kv_heads, rows, group, dim).transpose(0, 1)
    return output.reshape(rows, heads, 1, dim), lse.reshape(rows, heads, 1)


def plain_own_part(query, key, value, scaling: float, mask: torch.Tensor | None):
    """Each row's queries (rows, heads, 1, dim) against its own keys and values (rows, kv_heads, columns, dim) as
    batched matrix products, grouped-query heads folded into the rows (no key repeated); ``mask`` (rows, columns).
    Output and log-sum-exp as `prefix_part`'s."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    queries = query.reshape(rows * kv_heads, heads // kv_heads, dim)
    scores = float32_product(queries, key.flatten(0, 1).transpose(1, 2)).view(rows, kv_heads, -1, key.shape[2])
    weights, lse = softmax_weights(scores, mask, scaling, value.dtype)
    output = float32_product(weights.flatten(0, 1), value.flatten(0, 1))
    return output.reshape(rows, heads, 1, dim), lse.reshape(rows, heads, 1)


def softmax_weights(scores: torch.Tensor, mask: torch.Tensor | None, scaling: float, dtype: torch.dtype):
    """Scores (rows, kv_heads, group, columns), scaled and with the rows' ``mask`` (rows, columns) added: their
    softmax in ``dtype`` (the values') and their float32 log-sum-exp (rows, kv_heads, group)."""
    scores = scores * scaling if mask is None else torch.add(mask[:, None, None], scores, alpha=scaling)
    lse = scores.logsumexp(-1)
    return torch.exp(scores - lse[..., None]).to(dtype), lse


# The own part's kernel on a GPU: "flex" (PyTorch's FlexAttention, compiled once per cache shape: its decoding
# kernel splits the columns over the GPU's cores and fuses the mask, in one pass) or "plain" (`plain_own_part`).
OWN_PART_KERNEL = "flex"


def flex_own_part(query, key, value, scaling: float, mask: torch.Tensor | None):
    """`plain_own_part` through FlexAttention: the mask added to each score inside the kernel."""

    from torch.nn.attention.flex_attention import AuxRequest

    def add_mask(score, row, head, query_index, column):
        return score if mask is None else score + mask[row, column]

    output, aux = compiled_flex_attention()(
        query, key, value, score_mod=add_mask, scale=scaling, enable_gqa=True, return_aux=AuxRequest(lse=True)
    )
    return output.float(), aux.lse


@cache
def compiled_flex_attention():
    """FlexAttention runs compiled (its kernels are generated for the score function; a new mask in the same
    function compiles nothing); compiled on first use, then per new shape."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def float32_product(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The batched product ``first @ second`` in float32. On a GPU a half-precision product accumulates in float32
    anyway and writes it so, without copying its operands (the keys and values) to float32; elsewhere they are."""
    if first.is_cuda and first.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(first, second, out_dtype=torch.float32)
    return torch.bmm(first.float(), second.float())
