"""LoRA's projection as one autograd function (train.fused_lora): fewer kernels, casts and Python calls per step.

peft computes ``base(x) + B(A(dropout(x))) * scale`` as separate modules and operations, each a kernel launch and
an autograd node: under bf16 autocast ~8 kernels forward (dropout, two weight casts, three products, the scaling,
the sum) and ~10 backward per projection, 224 projections on Llama-3-8B. At 8 examples a step the GPU waits for the
CPU to issue them. Here the scale rides on the cast of A (one kernel that scales and casts), B's product adds into
the base output inside the matrix product (``addmm_``), and the adapters' weight gradients come out of the matrix
product in fp32 (on CUDA, ``torch.mm(..., out_dtype=float32)``), so nothing is cast back: 6 kernels forward and 8
backward with dropout, 5 and 6 without. The numbers are peft's up to rounding (tests/test_fused_lora.py).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class FusedLoraProduct(torch.autograd.Function):
    """``x @ weight.T + bias + scale * dropout(x) @ lora_a.T @ lora_b.T`` in ``dtype``; gradients for ``x``, ``lora_a``
    and ``lora_b`` only (the base ``weight`` and ``bias`` are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, dropout: float, dtype: torch.dtype):
        x = x.to(dtype)
        if dropout:
            dropped, mask = torch.native_dropout(x, dropout, True)  # the draws and values of peft's nn.Dropout
        else:
            dropped, mask = x, None
        scaled_a = torch.empty(lora_a.shape, dtype=dtype, device=lora_a.device)
        torch.mul(lora_a, scale, out=scaled_a)  # scaled and cast in one kernel
        b = lora_b.to(dtype)
        flat = dropped.reshape(-1, dropped.shape[-1])
        mask = None if mask is None else mask.reshape(flat.shape)
        hidden = flat @ scaled_a.T  # (tokens, r): the scale is in it, and so in B's gradient
        output = torch.nn.functional.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        output.view(-1, output.shape[-1]).addmm_(hidden, b.T)
        ctx.save_for_backward(weight, flat, mask, scaled_a, b, hidden)
        ctx.scale, ctx.dropout = scale, dropout
        return output

    @staticmethod
    def backward(ctx, grad_output):
        weight, flat, mask, scaled_a, b, hidden = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1]).to(b.dtype)
        grad_b = _matmul_fp32(grad.T, hidden)
        grad_hidden = grad @ b  # (tokens, r), with respect to ``hidden``, which holds the scale once
        grad_a = _matmul_fp32(grad_hidden.T, flat).mul_(ctx.scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(b.dtype)
            if mask is None:
                grad_x.addmm_(grad_hidden, scaled_a)
            else:
                grad_dropped = grad_hidden @ scaled_a
                grad_x += torch.ops.aten.native_dropout_backward(grad_dropped, mask, 1 / (1 - ctx.dropout))
            grad_x = grad_x.view(*grad_output.shape[:-1], flat.shape[-1])
        # (autograd casts each gradient to its input's dtype: the fp32 adapter weights take these as they are)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _matmul_fp32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` in fp32: accumulated and written in fp32 by cuBLAS for half-precision inputs on CUDA (no
    rounding to bf16, no cast kernel); elsewhere the product in the inputs' dtype, cast (CPU has no such kernel)."""
    if left.dtype == torch.float32:
        return left @ right
    if left.is_cuda:
        return torch.mm(left, right, out_dtype=torch.float32)
    return (left @ right).float()


def _fused_forward(module: LoraLinear, peft_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``module``'s forward through FusedLoraProduct where it is plain LoRA on a plain linear layer with one active
    adapter; peft's own forward for anything else (adapters disabled or merged, mixed batches, DoRA and other
    variants, LoRA biases)."""
    adapters = module.active_adapters
    if (
        args
        or kwargs
        or module.disable_adapters
        or module.merged
        or len(adapters) != 1
        or adapters[0] not in module.lora_A
        or adapters[0] in module.lora_variant
    ):
        return peft_forward(x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if lora_b.bias is not None or module.base_layer.weight.requires_grad:
        return peft_forward(x, *args, **kwargs)
    dropout = module.lora_dropout[name]
    rate = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    base = module.base_layer
    return FusedLoraProduct.apply(
        x, base.weight, base.bias, lora_a.weight, lora_b.weight, module.scaling[name], rate, dtype
    )


@contextmanager
def fused_lora(model: torch.nn.Module, active: bool = True) -> Iterator[int]:
    """Within the block, every peft LoRA linear layer of ``model`` on a plain ``nn.Linear`` computes through
    FusedLoraProduct; peft's forward is back afterwards. Yields how many layers were switched (0 if not ``active``)."""
    layers = [
        module
        for module in model.modules()
        if active and isinstance(module, LoraLinear) and type(module.base_layer) is torch.nn.Linear
    ]
    for layer in layers:
        # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up on the instance.
        layer.forward = _bound(layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def _bound(layer: LoraLinear):
    peft_forward = type(layer).forward.__get__(layer)

    def forward(x, *args, **kwargs):
        return _fused_forward(layer, peft_forward, x, *args, **kwargs)

    return forward
