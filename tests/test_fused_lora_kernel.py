"""The Triton kernel of fused LoRA's backward through dropout (redistill/fused_lora_kernel.py). It runs on a GPU, or
under Triton's interpreter where Triton is installed."""

import pytest
import torch
from triton_kernels import needs_triton, run_under_interpreter, runs_here

from redistill.fused_lora import FusedLoraProduct

pytestmark = needs_triton


@pytest.mark.parametrize("inner", [32, 128])  # one step of the rank, two
def test_the_kernel_adds_the_masked_scaled_product_in_place(kernel_device, inner):
    from redistill.fused_lora_kernel import add_masked_product

    rows, columns, scale = 150, 200, 1 / 0.9  # neither a whole number of tiles
    # a GPU runs it as training does, in bfloat16, against the product of the same rounded inputs in fp32
    dtype, tolerance = (torch.bfloat16, 1e-2) if kernel_device == "cuda" else (torch.float32, 1e-5)
    generator = torch.Generator().manual_seed(0)
    into, left, right = (
        torch.randn(shape, generator=generator).to(dtype)
        for shape in ((rows, columns), (rows, inner), (inner, columns))
    )
    mask = torch.rand((rows, columns), generator=generator) > 0.1
    expected = into.float() + scale * mask * (left.float() @ right.float())
    device = torch.device(kernel_device)
    into, left, right, mask = (tensor.to(device) for tensor in (into, left, right, mask))
    returned = add_masked_product(into, left, right, mask, scale)
    assert returned is into
    torch.testing.assert_close(into.float().cpu(), expected, rtol=tolerance, atol=tolerance)


def test_the_kernel_takes_ranks_of_whole_steps_or_one_power_of_two():
    from redistill.fused_lora_kernel import fits

    assert [rank for rank in (8, 16, 24, 32, 64, 96, 128, 256) if fits(torch.empty(4, rank))] == [16, 32, 64, 128, 256]


def lora_inputs(device: str, rank: int) -> list[torch.Tensor]:
    """x, the base weight, A and B of a small projection (96 in, 80 out, two rows of 70 tokens)."""
    generator = torch.Generator().manual_seed(1)
    shapes = ((2, 70, 96), (80, 96), (rank, 96), (80, rank))
    return [torch.randn(shape, generator=generator).to(device) for shape in shapes]


def fused_lora_gradients(inputs, dtype, kernel: bool, draws: bool, seed: int = 3) -> list[torch.Tensor]:
    """FusedLoraProduct's output and the gradients of x, A and B (scale 0.5, dropout 0.1) under ``seed``."""
    x, weight, lora_a, lora_b = inputs
    trained = [x.clone().requires_grad_(), lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()]
    torch.manual_seed(seed)
    x_in, a_in, b_in = trained
    output = FusedLoraProduct.apply(x_in, weight.to(dtype), None, a_in, b_in, 0.5, 0.1, dtype, kernel, draws)
    output.float().pow(2).sum().backward()
    return [output.detach().float()] + [tensor.grad.float() for tensor in trained]


def assert_close_all(got: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * theirs.abs().max().item())


@pytest.mark.parametrize("rank", [32, 24])  # through the kernel; a rank it does not take, through the fallback
def test_fused_lora_with_the_kernel_gives_the_gradients_without_it(kernel_device, rank):
    dtype, tolerance = (torch.bfloat16, 2e-2) if kernel_device == "cuda" else (torch.float32, 1e-5)
    inputs = lora_inputs(kernel_device, rank)
    without = fused_lora_gradients(inputs, dtype, kernel=False, draws=False)
    assert_close_all(fused_lora_gradients(inputs, dtype, kernel=True, draws=False), without, tolerance)


def test_dropout_draws_its_mask_from_the_seed_and_each_position(kernel_device):
    from redistill.fused_lora_kernel import add_masked_product, drawn_mask, dropout

    rows, columns, rate = 150, 200, 0.3
    generator = torch.Generator().manual_seed(0)
    x, left, right, into = (
        torch.randn(shape, generator=generator).to(kernel_device)
        for shape in ((rows, columns), (rows, 32), (32, columns), (rows, columns))
    )
    seed, other = (torch.tensor([value], device=kernel_device) for value in (1234, 1235))
    mask = drawn_mask(rows, columns, rate, seed)
    torch.testing.assert_close(dropout(x, rate, seed), x * mask / (1 - rate))
    assert abs(mask.float().mean().item() - (1 - rate)) < 0.02  # 30,000 draws: 8 standard deviations
    assert torch.equal(drawn_mask(rows, columns, rate, seed), mask)
    assert (drawn_mask(rows, columns, rate, other) != mask).float().mean() > 0.2  # another seed, other draws
    drawn = add_masked_product(into.clone(), left, right, None, 2.0, seed, rate)
    torch.testing.assert_close(drawn, add_masked_product(into.clone(), left, right, mask, 2.0))


@pytest.mark.parametrize("rank", [32, 24])
def test_fused_lora_with_drawn_dropout_is_lora_with_that_mask(kernel_device, rank):
    """The forward's draws are the backward's: the output and gradients are plain LoRA's with the drawn mask."""
    from redistill.fused_lora_kernel import drawn_mask

    dtype, tolerance = (torch.bfloat16, 2e-2) if kernel_device == "cuda" else (torch.float32, 1e-5)
    inputs = lora_inputs(kernel_device, rank)
    drawn = fused_lora_gradients(inputs, dtype, kernel=False, draws=True, seed=3)
    torch.manual_seed(3)  # the seed the forward drew
    seed = torch.randint(2**31 - 1, (1,), device=kernel_device)
    x, weight, lora_a, lora_b = (tensor.to(dtype) for tensor in inputs)
    trained = [x.clone().requires_grad_(), lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()]
    x_in, a_in, b_in = trained
    kept = drawn_mask(140, 96, 0.1, seed).view(2, 70, 96)
    output = x_in @ weight.T + 0.5 * (x_in * kept / 0.9) @ a_in.T @ b_in.T
    output.float().pow(2).sum().backward()
    assert_close_all(drawn, [output.detach().float()] + [tensor.grad.float() for tensor in trained], tolerance)


@runs_here
def test_under_tritons_interpreter():
    """This module's kernel tests, on the CPU, in a process where Triton starts in its interpreter."""
    run_under_interpreter(__file__)
