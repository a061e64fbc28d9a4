"""The Triton kernels of fused LoRA's dropout (redistill/fused_lora.py). `add_masked_product` (Speedups.dropout_kernel):
``into += scale * mask * (left @ right)``, the input's gradient through the adapter added to the base product's, in
one pass. Done as a product, dropout's backward and an addition, the (tokens, features) gradient is written and
read three times more, and those passes are memory-bound. `dropout` (Speedups.dropout_draws_in_kernel) draws its
mask from a seed and each element's position, so the backward draws it again instead of reading a stored one.
Triton comes with PyTorch's CUDA build; on a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``),
for tests."""

import torch
import triton
import triton.language as tl

# Tiles of 128 x 128 outputs, the rank in steps of 64, 4 warps: for 1,280 tokens of Llama-3-8B, 320 programs (4,096
# features) or 1,120 (14,336) on the H100's 132 multiprocessors; the fastest of seven tilings there (15.7 us against
# 29.3 us for the three kernels it replaces, 56.6 against 94.7 at 14,336; BENCHMARKS.md). Fixed, not autotuned: a
# CUDA graph's recording can't benchmark, and the row length changes between steps.
BLOCK_ROWS, BLOCK_COLUMNS, BLOCK_INNER, WARPS, STAGES = 128, 128, 64, 4, 3


@triton.jit
def _kept(seed, row, column, columns, rate):
    """Dropout's draws for a block of a (rows, columns) input, from ``seed`` and each element's position: the
    forward and the backward draw the same numbers. Kept where the uniform draw is at least ``rate``."""
    return tl.rand(tl.load(seed), row[:, None] * columns + column[None, :]) >= rate


@triton.jit
def _add_masked_product(
    into, left, right, mask, seed,
    rows, columns, scale, rate,
    into_row, left_row, right_row, mask_row,
    INNER: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, BLOCK_INNER: tl.constexpr,
    DRAWN: tl.constexpr,
):  # fmt: skip
    """One block of ``into``: the product over INNER accumulated in fp32, masked (``mask``, or with DRAWN the draws
    from ``seed``) and scaled, added, rounded once."""
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
    if DRAWN:
        kept = _kept(seed, row, column, columns, rate)
    else:
        kept = tl.load(mask + row[:, None] * mask_row + column[None, :], mask=inside, other=0) != 0
    at = into + row[:, None] * into_row + column[None, :]
    total = tl.load(at, mask=inside, other=0.0).to(tl.float32) + tl.where(kept, product * scale, 0.0)
    tl.store(at, total.to(into.dtype.element_ty), mask=inside)


@triton.jit
def _dropout(
    x, out, seed,
    rows, columns, rate, scale,
    x_row, out_row,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):  # fmt: skip
    """One block of ``out = x * kept * scale``, the draws from ``seed``."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    inside = (row < rows)[:, None] & (column < columns)[None, :]
    values = tl.load(x + row[:, None] * x_row + column[None, :], mask=inside, other=0.0).to(tl.float32)
    kept = _kept(seed, row, column, columns, rate)
    tl.store(out + row[:, None] * out_row + column[None, :], tl.where(kept, values * scale, 0.0), mask=inside)


def fits(left: torch.Tensor) -> bool:
    """Whether the kernel takes this inner size (the LoRA rank): whole steps of BLOCK_INNER, or one step of a
    power of two from 16 (the matrix products' smallest)."""
    inner = left.shape[1]
    return inner % BLOCK_INNER == 0 or (16 <= inner < BLOCK_INNER and inner & (inner - 1) == 0)


def add_masked_product(
    into: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    seed: torch.Tensor | None = None,
    rate: float = 0.0,
) -> torch.Tensor:
    """``into += scale * mask * (left @ right)`` in place: ``into`` (rows, columns), ``left`` (rows, inner), ``right``
    (inner, columns), each with unit stride along its last dimension; inner must `fit`. The mask is ``mask`` (bool,
    rows x columns), or without one the draws of `dropout` at ``rate`` from ``seed``."""
    rows, columns = into.shape
    inner = left.shape[1]
    step = min(BLOCK_INNER, inner)
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(columns, BLOCK_COLUMNS))
    drawn = mask is None
    # The kernel reads one of the two: the other pointer stands in for the one it doesn't.
    mask_bytes = seed if drawn else mask.view(torch.uint8)
    _add_masked_product[grid](
        into, left, right, mask_bytes, seed if drawn else mask_bytes,
        rows, columns, scale, rate,
        into.stride(0), left.stride(0), right.stride(0), 0 if drawn else mask_bytes.stride(0),
        INNER=inner, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS, BLOCK_INNER=step, DRAWN=drawn,
        num_warps=WARPS, num_stages=STAGES,
    )  # fmt: skip
    return into


# Dropout's blocks: 16 rows of 256 (4,096 elements, 4 warps), a memory-bound pass.
DROPOUT_ROWS, DROPOUT_COLUMNS = 16, 256


def dropout(x: torch.Tensor, rate: float, seed: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, columns) with each element zeroed at ``rate`` and the rest scaled by ``1 / (1 - rate)``, the
    draws from ``seed`` (a one-element integer tensor, read on the GPU: a CUDA graph replays it with the seed its
    step drew) and each element's position, so that `add_masked_product` draws them again instead of reading a
    stored mask. Other draws than PyTorch's dropout, from the same distribution."""
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, columns = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    grid = (triton.cdiv(rows, DROPOUT_ROWS), triton.cdiv(columns, DROPOUT_COLUMNS))
    _dropout[grid](
        x, out, seed,
        rows, columns, rate, 1 / (1 - rate),
        x.stride(0), out.stride(0),
        BLOCK_ROWS=DROPOUT_ROWS, BLOCK_COLUMNS=DROPOUT_COLUMNS,
        num_warps=4,
    )  # fmt: skip
    return out


def drawn_mask(rows: int, columns: int, rate: float, seed: torch.Tensor) -> torch.Tensor:
    """The mask that `dropout` draws from ``seed`` for a (rows, columns) input: where a rank does not `fit` the
    product's kernel, the backward takes it to PyTorch's dropout backward; and the tests' reference."""
    return dropout(torch.ones((rows, columns), device=seed.device), rate, seed) != 0
