"""The Triton kernel of redistill/live_attention.py (its docstring says what it computes). Triton comes with
PyTorch's CUDA build; on a CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``), for tests."""

import triton
import triton.language as tl


@triton.jit
def accumulate(q, k, v, added, valid, scaling, top, total, acc):
    """One block of columns into the running softmax: its largest score, sum of weights and weighted values."""
    scores = tl.dot(q, tl.trans(k)) * scaling + added[None, :]
    scores = tl.where(valid[None, :], scores, float("-inf"))
    new_top = tl.maximum(top, tl.max(scores, 1))
    weights = tl.exp(scores - new_top[:, None])
    shrink = tl.exp(top - new_top)
    return new_top, total * shrink + tl.sum(weights, 1), acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)


@triton.jit
def attend(
    query, key, value, mask, starts, bounds, output,
    query_row, query_head,
    key_row, key_head, key_column,
    value_row, value_head, value_column,
    mask_row, output_row, output_head,
    columns, scaling,
    GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row's query heads of one key/value head (a program each) against the row's live columns."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    prefix = tl.load(bounds)
    end = tl.load(bounds + 1)
    ring = columns - prefix
    start = tl.load(starts + row)
    own = (end - start - 1 + ring) % ring + 1  # the row's own columns, the one just written included
    heads = tl.arange(0, GROUP_ROWS)  # padded to the matrix products' smallest size
    dims = tl.arange(0, DIM)
    in_group = heads < GROUP
    q = tl.load(
        query + row * query_row + (kv_head * GROUP + heads)[:, None] * query_head + dims[None, :],
        mask=in_group[:, None],
        other=0.0,
    )
    top = tl.full((GROUP_ROWS,), -1.0e30, tl.float32)  # finite: a first block all blocked gives no NaN
    total = tl.zeros((GROUP_ROWS,), tl.float32)
    acc = tl.zeros((GROUP_ROWS, DIM), tl.float32)
    offsets = tl.arange(0, BLOCK)
    for first in range(0, prefix, BLOCK):  # the shared prefix, the first row's copy: the same for every row
        column = first + offsets
        valid = column < prefix
        k = tl.load(
            key + kv_head * key_head + column[:, None] * key_column + dims[None, :], mask=valid[:, None], other=0.0
        )
        v = tl.load(
            value + kv_head * value_head + column[:, None] * value_column + dims[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        zero = tl.zeros((BLOCK,), tl.float32)
        top, total, acc = accumulate(q, k, v, zero, valid, scaling, top, total, acc)
    for first in range(0, own, BLOCK):  # the row's own columns, round the ring from its first one
        step = first + offsets
        valid = step < own
        column = prefix + (start - prefix + step) % ring
        k = tl.load(
            key + row * key_row + kv_head * key_head + column[:, None] * key_column + dims[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        v = tl.load(
            value + row * value_row + kv_head * value_head + column[:, None] * value_column + dims[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        added = tl.load(mask + row * mask_row + column, mask=valid, other=0.0).to(tl.float32)
        top, total, acc = accumulate(q, k, v, added, valid, scaling, top, total, acc)
    tl.store(
        output + row * output_row + (kv_head * GROUP + heads)[:, None] * output_head + dims[None, :],
        (acc / total[:, None]).to(output.dtype.element_ty),
        mask=in_group[:, None],
    )
