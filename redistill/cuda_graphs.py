"""train.cuda_graphs: the decoder layers' forward and backward recorded once as CUDA graphs, then replayed.

At the post's 8 examples a step (~1,170 tokens) the GPU waits on the CPU: profiled on an H200, a step issues ~4,800
kernel launches, and the GPU is busy 121 ms of a 340 ms step (BENCHMARKS.md). Replayed, the layers' whole forward is
one launch and their whole backward another; what stays eager is the embedding, the final norm, the head and loss,
and the optimiser step.

A graph replays fixed shapes, so packed rows are padded to a few lengths (train.row_length_multiple, which always adds
its dummy example: the count of examples in a row is fixed too). One forward and one backward graph are recorded for
each row length, before the run's first step where its order of rows is known (training.py, `RecordRowShapesAhead`),
after one eager step at the first. They share one memory pool and keep only their inputs and output apart: the
activations that a forward saves for its backward are dead once that backward has run, so a step of one length may
reuse the memory of the last step of another. The adapters' gradients land, inside the backward graph, in one set of
buffers that every length shares (fused LoRA writes them there; others are copied), and are attached as the
parameters' ``.grad``; so the optimiser, gradient clipping and zeroing are the trainer's own. That needs one
micro-batch per optimiser step (train.grad_accum: 1): the next backward overwrites the buffers.

Not torch.compile's ``reduce-overhead`` mode: on an H200 its compiled backward crashed the process (a segmentation
fault on the first step, with and without CUDA graph trees); the layers here may still be compiled (train.compile),
and their compiled kernels are then what the graphs record.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from redistill.fused_lora import casts_once, gradients_into
from redistill.models import decoder_of

# Eager runs before a recording, where one is needed: cuBLAS, flash attention and Triton's kernels set up and compile
# on their first call, which can't happen while recording (tests/test_cuda_graphs.py).
WARMUP_STEPS = 1


class Recorded(Exception):  # a signal, not an error
    """A row shape was recorded within `GraphedLayers.recording_only`."""


@dataclass
class Recording:
    """The graphs of one row length: their inputs, output and output gradient at fixed addresses."""

    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the call's tensors (call_tensors): hidden states, cos, sin, boundaries, ...
    output: torch.Tensor
    grad_output: torch.Tensor
    grad_input: torch.Tensor | None  # where the hidden states ask for a gradient (train.compile's first layer)


class ReplayLayers(torch.autograd.Function):
    """The layers' forward as a replay; its backward replays the backward graph and attaches the adapters' gradients.
    ``anchor`` is a trainable parameter, so that the output asks for a gradient when the hidden states don't."""

    @staticmethod
    def forward(ctx, layers: "GraphedLayers", recording: Recording, anchor, *inputs):
        for static, live in zip(recording.inputs, inputs, strict=True):
            static.copy_(live)
        recording.forward.replay()
        ctx.layers, ctx.recording = layers, recording
        return recording.output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        recording = ctx.recording
        recording.grad_output.copy_(grad_output)
        recording.backward.replay()
        ctx.layers.attach_gradients()
        return None, None, None, recording.grad_input, *[None] * (len(recording.inputs) - 1)


class GraphedLayers:
    """Stands in for a decoder's ``layers`` attribute, which the decoder's forward loops over: that loop finds one
    callable that runs every layer. The layers stay registered where they were, so parameter names, the state dict and
    the saved adapter are unchanged."""

    def __init__(self, layers: torch.nn.ModuleList, compiled: bool = False, casts_once: bool = False) -> None:
        self.layers = layers
        self.compiled = compiled
        self.casts_once = casts_once
        self.trainable = [parameter for parameter in layers.parameters() if parameter.requires_grad]
        self.gradients: list[torch.Tensor] | None = None
        self.casts: list[torch.Tensor] = []  # the trainable weights in the compute dtype (casts_once)
        self.recordings: dict[tuple, Recording] = {}
        self.eager_runs: dict[tuple, int] = {}
        self.pool = None
        self.stop_after_recording = False  # `recording_only`

    def __getitem__(self, index: slice) -> list["GraphedLayers"]:
        return [self]

    def __len__(self) -> int:
        return len(self.layers)

    def __call__(self, hidden_states, **kwargs):
        cu_seq_lens, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if not self._replayable(hidden_states, cu_seq_lens, max_length):
            return self.run(hidden_states, **kwargs)
        key = (hidden_states.shape[1], cu_seq_lens.numel(), max_length, hidden_states.requires_grad)
        if key not in self.recordings:
            readies = self._readied_by(key)
            if self.eager_runs.get(readies, 0) < WARMUP_STEPS:
                self.eager_runs[readies] = self.eager_runs.get(readies, 0) + 1
                with uncached_autocast(hidden_states.device):
                    return self.run(hidden_states, **kwargs)
            self.recordings[key] = self._record(hidden_states, kwargs)
            if self.stop_after_recording:
                raise Recorded
        inputs = call_tensors(hidden_states, kwargs)
        return ReplayLayers.apply(self, self.recordings[key], self.trainable[0], *inputs)

    @contextmanager
    def recording_only(self) -> Iterator[None]:
        """Within the block, a call that records its shape raises `Recorded` instead of replaying the recording:
        a step run only to record its row shape (training.RecordRowShapesAhead) stops there, with no forward and
        backward to compute (~0.1 s of GPU work a shape on an 8B)."""
        self.stop_after_recording = True
        try:
            yield
        finally:
            self.stop_after_recording = False

    def run(self, hidden_states, **kwargs):
        """The layers one after another, as the decoder's own loop runs them."""
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        return hidden_states

    def attach_gradients(self) -> None:
        for parameter, gradient in zip(self.trainable, self.gradients, strict=True):
            if parameter.grad is None:
                parameter.grad = gradient
            else:
                parameter.grad.add_(gradient)

    def _readied_by(self, key: tuple) -> tuple:
        """The shapes that eager runs at ``key`` ready for recording: compiled layers compile for each shape; eager
        ones only where Triton specialises its kernels, on whether an integer argument (the row length) divides by
        16. So with rows padded to a multiple of 16 only the first length runs eagerly."""
        length, _, _, asks_gradient = key
        return key if self.compiled else (length % 16 == 0, asks_gradient)

    def _replayable(self, hidden_states, cu_seq_lens_q, max_length_q) -> bool:
        """A training step's packed row on a GPU: what the graphs were recorded for."""
        return (
            hidden_states.is_cuda
            and torch.is_grad_enabled()
            and self.layers[0].training
            and cu_seq_lens_q is not None
            and isinstance(max_length_q, int)
            and hidden_states.shape[0] == 1
            and bool(self.trainable)
        )

    def _record(self, hidden_states: torch.Tensor, kwargs: dict) -> Recording:
        """Records the layers' forward and backward for this call's shapes (after any eager runs), with the
        call's own arguments at fixed addresses."""
        device = hidden_states.device
        if self.gradients is None:
            self.gradients = [torch.empty_like(parameter) for parameter in self.trainable]
            self.pool = torch.cuda.graph_pool_handle()
            if self.casts_once and torch.is_autocast_enabled(device.type):
                dtype = torch.get_autocast_dtype(device.type)
                self.casts = [torch.empty_like(parameter, dtype=dtype) for parameter in self.trainable]
        inputs, hidden, static_kwargs = static_call(hidden_states, kwargs)
        wants = self.trainable + ([hidden] if hidden.requires_grad else [])
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # Fused LoRA writes the adapters' gradients straight into the shared buffers (any others are copied there)
        # and, with casts_once, reads the adapter weights cast at the forward's start, after the optimiser's step.
        casts = self.trainable if self.casts else []
        with (
            uncached_autocast(device),
            gradients_into(self.trainable, self.gradients),
            casts_once(casts, self.casts),
        ):
            torch.cuda.synchronize()
            with torch.cuda.graph(forward, pool=self.pool):
                if self.casts:
                    torch._foreach_copy_(self.casts, self.trainable)
                output = self.run(hidden, **static_kwargs)
            grad_output = torch.empty_like(output)
            with torch.cuda.graph(backward, pool=self.pool):
                gradients = torch.autograd.grad(output, wants, grad_output)
                elsewhere = [
                    (buffer, gradient)
                    for buffer, gradient in zip(self.gradients, gradients, strict=False)
                    if gradient.data_ptr() != buffer.data_ptr()
                ]
                if elsewhere:
                    torch._foreach_copy_(*map(list, zip(*elsewhere, strict=True)))
            grad_input = gradients[-1] if hidden.requires_grad else None
        # Only the inputs, output and gradients stay: the saved activations are freed for the other lengths' graphs.
        return Recording(forward, backward, tuple(inputs), output.detach(), grad_output, grad_input)


def uncached_autocast(device: torch.device) -> torch.autocast:
    """The step's autocast without its cache of cast weights, for a recording and the eager steps before it. A graph
    recorded with the cache would replay the casts of the step it was recorded in, not follow the adapters' updates;
    and compiled layers (train.compile) guard on the autocast state: compiled under another, they would compile again
    inside the recording, where compiling can't run."""
    kind = device.type
    dtype, enabled = torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind)
    return torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=False)


def call_tensors(hidden_states: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
    """The layers' call's tensors in a fixed order: the hidden states, then each tensor among the keyword arguments
    (inside tuples too, as the rotary cos and sin), a tensor passed twice once."""
    tensors = {id(hidden_states): hidden_states}
    for value in kwargs.values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.Tensor):
                tensors.setdefault(id(item), item)
    return list(tensors.values())


def static_call(hidden_states: torch.Tensor, kwargs: dict) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """The call at fixed addresses: a clone of each of its tensors (in `call_tensors`' order), and the hidden states
    and keyword arguments with the clones in their places. The same arguments, the same aliasing: compiled layers
    would compile again for a call that differs from the eager steps' in either."""
    clones = {id(tensor): fixed_copy(tensor) for tensor in call_tensors(hidden_states, kwargs)}

    def fixed(value):
        if isinstance(value, tuple):
            return tuple(fixed(item) for item in value)
        return clones[id(value)] if isinstance(value, torch.Tensor) else value

    return list(clones.values()), fixed(hidden_states), {name: fixed(value) for name, value in kwargs.items()}


def fixed_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with its sizes, strides and gradient flag; of a view (a mask cut from a larger one, say),
    the same view of a copy of its base, as compiled code guards on a view's base too."""
    if tensor._base is None:
        return tensor.detach().clone().requires_grad_(tensor.requires_grad)
    base = fixed_copy(tensor._base)
    return base.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset())


@contextmanager
def cuda_graph_layers(
    model: torch.nn.Module, active: bool = True, compiled: bool = False, casts_once: bool = False
) -> Iterator[GraphedLayers | None]:
    """Within the block, ``model``'s decoder runs its layers (``compiled``: torch.compiled ones) through
    `GraphedLayers`, which the block yields (on a GPU; as before elsewhere). None where not ``active``. With
    ``casts_once`` (for fused LoRA) each forward graph casts all the adapter weights to the compute dtype at its
    start, for FusedLoraProduct to read (fused_lora.casts_once)."""
    if not active:
        yield None
        return
    decoder = decoder_of(model)
    graphed = GraphedLayers(decoder._modules["layers"], compiled, casts_once)
    # The instance attribute shadows the registered module for attribute lookup only: `_modules` keeps the layers.
    object.__setattr__(decoder, "layers", graphed)
    try:
        yield graphed
    finally:
        del decoder.__dict__["layers"]
