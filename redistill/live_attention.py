"""The decoding step's attention reading only what each row can see: its own written columns, and the shared prefix.

A static batch's cache is as wide as its longest sentence and answer (redistill/generation.py), and SDPA's kernels
read every column of every row and mask most away: on an 8B model at the cap, a step's attention read ~3x what the
rows may look at (each row's own columns, on average a third of the width after the prefix). Here one Triton
program per row and key/value head reads the shared prefix's columns of the *first* row (every row holds the same
prefix, so after the first program they come from the GPU's L2 cache, not its memory), then only the row's own
columns: from where its sentence starts to the column the step just wrote, going round the ring of columns after
the prefix as continuous batching's rows do (`StaticGraphCache.admit`). The mask is still added on those columns
(it blocks the padding before a sentence), so the result is SDPA's over the whole row, up to rounding.

Where the columns are reaches the kernel through two tensors at fixed addresses (a captured CUDA graph reads them at
each replay): ``starts`` (rows,), each row's first own column, and ``bounds`` (2,), the prefix's length and the
column after the last one written. `attending_to_live_columns` switches a model's attention to this function for a
forward pass; prefills (more than one query token), heads the kernel can't take (narrower than 16, or not a power
of two) and anything on a CPU run transformers' SDPA, whose mask gives the same answer. On a CPU the kernel itself
runs under Triton's interpreter (``TRITON_INTERPRET=1``; tests).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

# transformers checks implementation names for "sdpa", "flash" and "flex": this one must hold none of them
LIVE_COLUMN_ATTENTION = "redistill_live_columns"
# Columns a program reads at a time: answers' own columns are ~40-150 at the cap, the prefix ~70.
BLOCK_COLUMNS = 32


@contextmanager
def attending_to_live_columns(model) -> Iterator[None]:
    """``model``'s attention is `live_column_attention` inside the block (a CUDA graph captured there keeps it);
    its own implementation comes back after."""
    own = model.config._attn_implementation
    AttentionInterface.register(LIVE_COLUMN_ATTENTION, live_column_attention)
    AttentionMaskInterface.register(LIVE_COLUMN_ATTENTION, sdpa_mask)  # a 4D mask passes as it is
    model.set_attn_implementation(LIVE_COLUMN_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def live_column_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    live_starts: torch.Tensor | None = None,
    live_bounds: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: ``query`` (rows, heads, 1, head_dim), ``key`` and ``value`` the
    static cache's (rows, kv_heads, columns, head_dim), ``attention_mask`` (rows, 1, 1, columns) added to the
    scores; ``live_starts`` and ``live_bounds`` as the module's docstring says. Returns (rows, 1, heads, head_dim)."""
    on_kernel = query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    dim = query.shape[-1]
    fits_kernel = dim >= 16 and dim & (dim - 1) == 0  # the kernel's matrix products: 16 wide or more, powers of two
    if query.shape[2] != 1 or live_starts is None or not on_kernel or not fits_kernel:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scaling = dim**-0.5 if scaling is None else scaling
    return decode_attention(query, key, value, attention_mask, live_starts, live_bounds, scaling), None


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    starts: torch.Tensor,
    bounds: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """One query token per row against its live columns (see the module's docstring); the output as
    (rows, 1, heads, head_dim) in the query's dtype."""
    rows, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    group = heads // kv_heads
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("live-column attention needs the head dimension contiguous")
    mask = mask.reshape(rows, columns)  # (rows, 1, 1, columns): one row of the mask for every head
    output = torch.empty((rows, 1, heads, dim), dtype=query.dtype, device=query.device)
    kernel = _kernel()
    kernel[(rows, kv_heads)](
        query, key, value, mask, starts, bounds, output,
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        mask.stride(0), output.stride(0), output.stride(2),
        columns, scaling,
        GROUP=group, GROUP_ROWS=max(16, _next_power_of_2(group)), DIM=dim, BLOCK=BLOCK_COLUMNS,
    )  # fmt: skip
    return output


def _next_power_of_2(number: int) -> int:
    return 1 << (number - 1).bit_length()


def _kernel():
    """The Triton kernel, imported at first use: Triton comes with PyTorch's CUDA build, and a CPU install has none
    unless it runs the interpreter."""
    from redistill.live_attention_kernel import attend

    return attend
