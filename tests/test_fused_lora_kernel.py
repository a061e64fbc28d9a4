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


@pytest.mark.parametrize("rank", [32, 24])  # through the kernel; a rank it does not take, through the fallback
def test_fused_lora_with_the_kernel_gives_the_gradients_without_it(kernel_device, rank):
    dtype, tolerance = (torch.bfloat16, 2e-2) if kernel_device == "cuda" else (torch.float32, 1e-5)
    generator = torch.Generator().manual_seed(1)
    x, weight, lora_a, lora_b = (
        torch.randn(shape, generator=generator).to(kernel_device)
        for shape in ((2, 70, 96), (80, 96), (rank, 96), (80, rank))
    )
    gradients = {}
    for kernel in (False, True):
        inputs = [x.clone().requires_grad_(), lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()]
        torch.manual_seed(3)  # the same dropout draws
        x_in, a_in, b_in = inputs
        output = FusedLoraProduct.apply(x_in, weight.to(dtype), None, a_in, b_in, 0.5, 0.1, dtype, kernel)
        output.float().pow(2).sum().backward()
        gradients[kernel] = [tensor.grad.float() for tensor in inputs]
    for with_kernel, without in zip(gradients[True], gradients[False], strict=True):
        torch.testing.assert_close(with_kernel, without, rtol=tolerance, atol=tolerance * without.abs().max().item())


@runs_here
def test_under_tritons_interpreter():
    """This module's kernel tests, on the CPU, in a process where Triton starts in its interpreter."""
    run_under_interpreter(__file__)
