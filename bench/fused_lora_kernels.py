"""Fused LoRA's backward through dropout as one kernel (redistill/fused_lora_kernel.py) against the PyTorch kernels
it replaces, at Llama-3-8B's widths, on one GPU:

    python bench/fused_lora_kernels.py --tokens 1280 --rank 256 --out kernels.json

``grad_hidden @ A``, PyTorch's dropout backward and the addition into the input's gradient (three kernels), against
`add_masked_product` reading the stored mask; and PyTorch's dropout itself (its output and a bool mask), for scale.

Microseconds a call (CUDA events over 200 calls after 5 warm-up calls) for each width of an input (4,096: q, k, v,
o, gate, up; 14,336: down)."""

import argparse

import torch
from common import micro_benchmark_args, time_widths

from redistill.fused_lora_kernel import add_masked_product


def microseconds(call, repeats: int = 200) -> float:
    for _ in range(5):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000


def widths(tokens: int, rank: int, width: int, rate: float) -> dict:
    """The calls' times for inputs of ``width`` features."""
    scale = 1 / (1 - rate)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    grad_hidden, a = torch.randn(tokens, rank, **bf16), torch.randn(rank, width, **bf16) * 0.05
    x, into = torch.randn(tokens, width, **bf16), torch.randn(tokens, width, **bf16)
    mask = torch.rand(tokens, width, device="cuda") >= rate

    def three_kernels():
        into.add_(torch.ops.aten.native_dropout_backward(grad_hidden @ a, mask, scale))

    def stored():
        add_masked_product(into, grad_hidden, a, mask, scale)

    return {
        "backward, three kernels": microseconds(three_kernels),
        "backward, one kernel, stored mask": microseconds(stored),
        "dropout, PyTorch's": microseconds(lambda: torch.native_dropout(x, rate, True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dropout", type=float, default=0.05)
    args = micro_benchmark_args(parser)
    time_widths(
        args.out,
        args.tokens,
        args.rank,
        (4096, 14336),
        lambda width: widths(args.tokens, args.rank, width, args.dropout),
    )


if __name__ == "__main__":
    main()
