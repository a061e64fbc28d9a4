"""LoRA's projection as one autograd function (train.fused_lora): fewer kernels, casts and Python calls per step.

peft computes ``base(x) + B(A(dropout(x))) * scale`` as separate modules and operations, each a kernel launch and
an autograd node: under bf16 autocast ~8 kernels forward (dropout, two weight casts, three products, the scaling,
the sum) and ~10 backward per projection, 224 projections on Llama-3-8B. At 8 examples a step the GPU waits for the
CPU to issue them. Here the scale rides on the matrix products (cuBLAS's ``alpha``), B's product adds into the
base output inside the matrix product (``addmm_``), and the adapters' weight gradients come out of the matrix product
in fp32, scaled as cuBLAS writes them (on CUDA, ``torch.addmm(..., out_dtype=float32, alpha=scale)``), so nothing is
cast or scaled afterwards: 6 kernels forward and 7 backward with dropout, 5 and 5 without. Where the CUDA graphs
cast every adapter weight at once (`casts_once`) the forward's two casts go; with the backward through dropout as
one Triton kernel (redistill/fused_lora_kernel.py), 5 backward. The numbers are peft's up to rounding
(tests/test_fused_lora.py).
"""

import importlib.util
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

_gradients_into: dict[int, torch.Tensor] = {}  # id(adapter weight) -> its gradient's buffer (`gradients_into`)
_casts: dict[int, torch.Tensor] = {}  # id(adapter weight) -> its copy in the compute dtype (`casts_once`)
_TRITON = importlib.util.find_spec("triton") is not None  # PyTorch's CUDA builds bring it


class FusedLoraProduct(torch.autograd.Function):
    """``x @ weight.T + bias + scale * dropout(x) @ lora_a.T @ lora_b.T`` in ``dtype``; gradients for ``x``, ``lora_a``
    and ``lora_b`` only (the base ``weight`` and ``bias`` are frozen)."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scale: float,
        dropout: float,
        dtype: torch.dtype,
        kernel: bool = False,
        shared: "SharedGradient | None" = None,
    ):
        x = x.to(dtype)
        if dropout:
            dropped, mask = torch.native_dropout(x, dropout, True)  # the draws and values of peft's nn.Dropout
        else:
            dropped, mask = x, None
        a, b = _cast(lora_a, dtype), _cast(lora_b, dtype)
        flat = dropped.reshape(-1, dropped.shape[-1])
        mask = None if mask is None else mask.reshape(flat.shape)
        hidden = flat @ a.T  # (tokens, r)
        output = torch.nn.functional.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        output.view(-1, output.shape[-1]).addmm_(hidden, b.T, alpha=scale)
        ctx.save_for_backward(weight, flat, mask, a, b, hidden)
        ctx.scale, ctx.dropout, ctx.kernel, ctx.shared = scale, dropout, kernel, shared
        ctx.gradients_into = (_gradients_into.get(id(lora_a)), _gradients_into.get(id(lora_b)))
        return output

    @staticmethod
    def backward(ctx, grad_output):
        weight, flat, mask, a, b, hidden = ctx.saved_tensors
        into_a, into_b = ctx.gradients_into
        grad = grad_output.reshape(-1, grad_output.shape[-1]).to(b.dtype)
        grad_b = _matmul_fp32(grad.T, hidden, into_b, ctx.scale)
        grad_hidden = grad @ b  # (tokens, r): ``hidden``'s gradient over the scale
        grad_a = _matmul_fp32(grad_hidden.T, flat, into_a, ctx.scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            shared = ctx.shared
            if shared is None or shared.gradient is None:
                grad_x = grad @ weight.to(b.dtype)
            else:  # the siblings' gradient so far, added to inside the product
                grad_x = shared.gradient.addmm_(grad, weight.to(b.dtype))
            if mask is None:
                grad_x.addmm_(grad_hidden, a, alpha=ctx.scale)
            else:
                _add_through_dropout(grad_x, grad_hidden, a, mask, ctx.scale / (1 - ctx.dropout), ctx.kernel)
            if shared is not None:
                grad_x = shared.add_up(grad_x)
            if grad_x is not None:
                grad_x = grad_x.view(*grad_output.shape[:-1], flat.shape[-1])
        # (autograd casts each gradient to its input's dtype: the fp32 adapter weights take these as they are)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


@dataclass
class SharedGradient:
    """The gradient of one input that several fused projections read (an attention's q, k and v; an MLP's gate and
    up), built by their backwards together: the first writes it, each other adds its part inside its matrix product
    (cuBLAS's ``beta``), and the last hands the sum to autograd while the others hand on none. Autograd would add the
    projections' gradients in separate memory-bound passes: two for q, k and v, one for gate and up, 96 a step on
    Llama-3-8B. Every member's backward must run (each projection's output reaches the loss), as in an attention or
    an MLP block."""

    members: int = 0
    done: int = 0
    gradient: torch.Tensor | None = None

    def add_up(self, gradient: torch.Tensor) -> torch.Tensor | None:
        """After a member's backward has added its part to ``gradient``: the sum once every member has, else None."""
        self.done += 1
        if self.done < self.members:
            self.gradient = gradient
            return None
        self.gradient, self.done = None, 0  # ready for another backward through the same graph
        return gradient


class Siblings:
    """The fused projections of one module: those called one after another on the same input tensor share its
    gradient (`SharedGradient`)."""

    def __init__(self) -> None:
        self.input: weakref.ref | None = None
        self.shared = SharedGradient()

    def join(self, x: torch.Tensor) -> SharedGradient:
        if self.input is None or self.input() is not x:
            self.input, self.shared = weakref.ref(x), SharedGradient()
        self.shared.members += 1
        return self.shared


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``: its copy made within `casts_once` where there is one, else a cast."""
    copy = _casts.get(id(weight))
    return copy if copy is not None and copy.dtype == dtype else weight.to(dtype)


def _add_through_dropout(into, grad_hidden, a, mask, scale: float, kernel: bool) -> None:
    """``into += scale * mask * (grad_hidden @ a)``: the input's gradient through the adapter and dropout.
    With ``kernel``, on a GPU (or under Triton's interpreter), one Triton kernel (redistill/fused_lora_kernel.py);
    else a product, dropout's backward and an addition. (One ``addcmul_`` with the bool mask instead of the last two
    ran unvectorised on an H100: 37 us a call against 11 + 9.)"""
    if kernel and _TRITON and (into.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from redistill.fused_lora_kernel import add_masked_product, fits

        if fits(grad_hidden):
            add_masked_product(into, grad_hidden, a, mask, scale)
            return
    into += torch.ops.aten.native_dropout_backward(grad_hidden @ a, mask, scale)


def _matmul_fp32(left: torch.Tensor, right: torch.Tensor, into: torch.Tensor | None = None, scale: float = 1.0):
    """``scale * left @ right`` in fp32 (into ``into`` where given). On CUDA cuBLAS accumulates and writes it in
    fp32 for half-precision inputs and applies the scale as it writes: no rounding to bf16, no cast or scaling
    kernel. On a CPU, which has no such product, half-precision inputs multiply in their dtype, then cast."""
    if left.dtype == torch.float32 or left.is_cuda:
        out = into if into is not None else left.new_empty((left.shape[0], right.shape[1]), dtype=torch.float32)
        fp32 = {} if left.dtype == torch.float32 else {"out_dtype": torch.float32}
        return torch.addmm(out, left, right, beta=0, alpha=scale, out=out, **fp32)  # beta 0: ``out`` only written
    product = (left @ right).float().mul_(scale)
    return product if into is None else into.copy_(product)


def _fused_forward(
    module: LoraLinear, peft_forward, kernel: bool, siblings: Siblings | None, x: torch.Tensor, *args, **kwargs
) -> torch.Tensor:
    """``module``'s forward through FusedLoraProduct where it is plain LoRA on a plain linear layer with one active
    adapter (sharing its input's gradient with ``siblings`` where given); peft's own forward for anything else
    (adapters disabled or merged, mixed batches, DoRA and other variants, LoRA biases)."""
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
    shared = siblings.join(x) if siblings is not None and torch.is_grad_enabled() else None
    return FusedLoraProduct.apply(
        x, base.weight, base.bias, lora_a.weight, lora_b.weight, module.scaling[name], rate, dtype, kernel, shared
    )


@contextmanager
def fused_lora(
    model: torch.nn.Module, active: bool = True, dropout_kernel: bool = False, shared_input_gradients: bool = False
) -> Iterator[int]:
    """Within the block, every peft LoRA linear layer of ``model`` on a plain ``nn.Linear`` computes through
    FusedLoraProduct (``dropout_kernel``: its backward through dropout in one Triton kernel where it can;
    ``shared_input_gradients``: the projections of one module that read the same input build its gradient together,
    `SharedGradient`); peft's forward is back afterwards. Yields how many layers were switched (0 if not
    ``active``)."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if active and isinstance(module, LoraLinear) and type(module.base_layer) is torch.nn.Linear
    }
    siblings = {name.rpartition(".")[0]: Siblings() for name in layers} if shared_input_gradients else {}
    for name, layer in layers.items():
        # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up on the instance.
        layer.forward = _bound(layer, dropout_kernel, siblings.get(name.rpartition(".")[0]))
    try:
        yield len(layers)
    finally:
        for layer in layers.values():
            del layer.forward


def _bound(layer: LoraLinear, dropout_kernel: bool, siblings: Siblings | None):
    peft_forward = type(layer).forward.__get__(layer)

    def forward(x, *args, **kwargs):
        return _fused_forward(layer, peft_forward, dropout_kernel, siblings, x, *args, **kwargs)

    return forward


@contextmanager
def gradients_into(weights: list[torch.Tensor], buffers: list[torch.Tensor]) -> Iterator[None]:
    """For the layers run forward within the block, FusedLoraProduct's backward writes each adapter weight's
    gradient into its buffer (``buffers``, in the order of ``weights``) instead of a new tensor; autograd hands that
    buffer on as the gradient. A CUDA graph's backward recorded so leaves the gradients where the optimiser reads
    them, with no copy (train.cuda_graphs). Each layer must run once a step: a second backward would overwrite the
    first's."""
    _gradients_into.update({id(weight): buffer for weight, buffer in zip(weights, buffers, strict=True)})
    try:
        yield
    finally:
        _gradients_into.clear()


@contextmanager
def casts_once(weights: list[torch.Tensor], copies: list[torch.Tensor]) -> Iterator[None]:
    """For the layers run forward within the block, FusedLoraProduct reads each adapter weight from its copy in the
    compute dtype (``copies``, in the order of ``weights``) instead of casting it; the caller keeps the copies
    current. A CUDA graph that refreshes them with one ``torch._foreach_copy_`` before its layers casts every adapter
    weight in a few kernels instead of two small ones per projection (train.cuda_graphs)."""
    _casts.update({id(weight): copy for weight, copy in zip(weights, copies, strict=True)})
    try:
        yield
    finally:
        _casts.clear()
