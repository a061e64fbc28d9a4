"""The Triton kernel of fused LoRA's backward through dropout (redistill/fused_lora.py, Speedups.dropout_kernel):
``into += scale * mask * (left @ right)``, the input's gradient through the adapter added to the base product's, in
one pass. Done as a product, dropout's backward and an addition, the (tokens, features) gradient is written and
read three times more, and those passes are memory-bound. Triton comes with PyTorch's CUDA build; on a CPU the
kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``), for tests."""

import torch
import triton
import triton.language as tl

# Tiles of 128 x 128 outputs, the rank in steps of 64, 4 warps: for 1,280 tokens of Llama-3-8B, 320 programs (4,096
# features) or 1,120 (14,336) on the H100's 132 multiprocessors; the fastest of seven tilings there (15.7 us against
# 29.3 us for the three kernels it replaces, 56.6 against 94.7 at 14,336; BENCHMARKS.md). Fixed, not autotuned: a
# CUDA graph's recording can't benchmark, and the row length changes between steps.
BLOCK_ROWS, BLOCK_COLUMNS, BLOCK_INNER, WARPS, STAGES = 128, 128, 64, 4, 3


@triton.jit
def _add_masked_product(
    into, left, right, mask,
    rows, columns, scale,
    into_row, left_row, right_row, mask_row,
    INNER: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, BLOCK_INNER: tl.constexpr,
):  # fmt: skip
    """One block of ``into``: the product over INNER accumulated in fp32, masked and scaled, added, rounded once."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    inner = tl.arange(0, BLOCK_INNER)
    row_in, column_in = row < rows, column < columns
    product = tl.zeros((BLOCK_ROWS, BLOCK_COLUMNS), dtype=tl.float32)
    for start in range(0, INNER, BLOCK_INNER):
        a = tl.load(left + row[:, None] * left_row + (start + inner)[None, :], mask=row_in[:, None], other=0.0)
        b = tl.load(right + (start + inner)[:, None] * right_row + column[None, :], mask=column_in[None, :], other=0.0)
        product = tl.dot(a, b, product)
    inside = row_in[:, None] & column_in[None, :]
    kept = tl.load(mask + row[:, None] * mask_row + column[None, :], mask=inside, other=0)
    at = into + row[:, None] * into_row + column[None, :]
    total = tl.load(at, mask=inside, other=0.0).to(tl.float32) + tl.where(kept != 0, product * scale, 0.0)
    tl.store(at, total.to(into.dtype.element_ty), mask=inside)


def fits(left: torch.Tensor) -> bool:
    """Whether the kernel takes this inner size (the LoRA rank): whole steps of BLOCK_INNER, or one step of a
    power of two from 16 (the matrix products' smallest)."""
    inner = left.shape[1]
    return inner % BLOCK_INNER == 0 or (16 <= inner < BLOCK_INNER and inner & (inner - 1) == 0)


def add_masked_product(
    into: torch.Tensor, left: torch.Tensor, right: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``into += scale * mask * (left @ right)`` in place: ``into`` and ``mask`` (bool) (rows, columns), ``left``
    (rows, inner), ``right`` (inner, columns), each with unit stride along its last dimension; inner must `fit`."""
    rows, columns = into.shape
    inner = left.shape[1]
    step = min(BLOCK_INNER, inner)
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(columns, BLOCK_COLUMNS))
    _add_masked_product[grid](
        into, left, right, mask.view(torch.uint8),
        rows, columns, scale,
        into.stride(0), left.stride(0), right.stride(0), mask.stride(0),
        INNER=inner, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS, BLOCK_INNER=step,
        num_warps=WARPS, num_stages=STAGES,
    )  # fmt: skip
    return into
