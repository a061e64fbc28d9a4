"""The LoRA adapters' matrix products at Llama-3-8B's widths on one GPU: cuBLAS's product against the same product
split over its inner dimension (a strided batched product, then a sum), and against cuBLASLt:

    python bench/lora_products.py --tokens 1280 --rank 256 --out products.json

At 1,280 tokens a step a rank-256 adapter's ``x @ A.T`` and ``grad @ B`` have outputs of 1,280 x 256: ten tiles by
two, so they look like products that leave most of an H100 idle. Splitting the inner dimension would give each
multiprocessor work; this measures whether it pays. Microseconds a product: the GPU's own time, 50 products recorded
as one CUDA graph and replayed (launching them one by one would time the host)."""

import argparse

import torch
from common import micro_benchmark_args, time_widths


def microseconds(call, repeats: int = 50) -> float:
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 5 / repeats * 1000


def split_product(left: torch.Tensor, right: torch.Tensor, parts: int, out_dtype=None) -> torch.Tensor:
    """``left @ right`` as ``parts`` products over slices of the inner dimension (views, no copies), summed."""
    rows, inner = left.shape
    step = inner // parts
    lefts = left.as_strided((parts, rows, step), (step * left.stride(1), left.stride(0), left.stride(1)))
    columns = right.shape[1]
    rights = right.as_strided((parts, step, columns), (step * right.stride(0), right.stride(0), right.stride(1)))
    partial = torch.bmm(lefts, rights) if out_dtype is None else torch.bmm(lefts, rights, out_dtype=out_dtype)
    return partial.sum(0)


def widths(tokens: int, rank: int, width: int) -> dict:
    """The products' times where the projection's other side is ``width`` features."""
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x, hidden = torch.randn(tokens, width, **bf16), torch.randn(tokens, rank, **bf16)
    a, b = torch.randn(rank, width, **bf16) * 0.02, torch.randn(width, rank, **bf16) * 0.02
    times = {}
    for name, left, right in (("x @ A.T", x, a.T), ("grad @ B", x, b)):
        times[name] = microseconds(lambda left=left, right=right: left @ right)
        for parts in (2, 4, 8):
            times[f"{name}, split {parts} ways"] = microseconds(
                lambda left=left, right=right, parts=parts: split_product(left, right, parts)
            )
    # The weights' gradients, written in fp32 (fused LoRA's): (width, tokens) @ (tokens, rank) and its transpose.
    grad_b, grad_a = torch.empty(width, rank, device="cuda"), torch.empty(rank, width, device="cuda")
    fp32 = torch.float32
    times["grad.T @ hidden (fp32)"] = microseconds(
        lambda: torch.addmm(grad_b, x.T, hidden, beta=0, out=grad_b, out_dtype=fp32)
    )
    times["grad.T @ hidden (fp32), split 2 ways"] = microseconds(lambda: split_product(x.T, hidden, 2, fp32))
    times["grad_hidden.T @ x (fp32)"] = microseconds(
        lambda: torch.addmm(grad_a, hidden.T, x, beta=0, out=grad_a, out_dtype=fp32)
    )
    times["grad_hidden.T @ x (fp32), split 2 ways"] = microseconds(lambda: split_product(hidden.T, x, 2, fp32))
    torch.backends.cuda.preferred_blas_library("cublaslt")
    times["x @ A.T, cuBLASLt"] = microseconds(lambda: x @ a.T)
    torch.backends.cuda.preferred_blas_library("cublas")
    return times


def main() -> None:
    args = micro_benchmark_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    # k and v's outputs; the model's width; the MLP's
    time_widths(
        args.out, args.tokens, args.rank, (1024, 4096, 14336), lambda width: widths(args.tokens, args.rank, width)
    )


if __name__ == "__main__":
    main()
