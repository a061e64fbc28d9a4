"""train.compile: the decoder layers compiled in place, optionally replayed as CUDA graphs (train.cuda_graphs), with
the compiler's caches on disk so that compiling is paid once per machine and model, not once per run."""

import os
from pathlib import Path

import torch
from transformers import TrainerCallback

# Under the user's cache folder, not /tmp (inductor's default): kept across reboots and `dvc exp run`s.
COMPILE_CACHE = Path.home() / ".cache" / "redistill" / "inductor"


def keep_compile_caches(folder: Path = COMPILE_CACHE) -> None:
    """Inductor's compiled graphs (FX graph cache) and AOTAutograd's forward/backward split (autograd cache) on disk
    under ``folder`` (unless TORCHINDUCTOR_CACHE_DIR names another): a later run of the same model and code loads
    them instead of generating and building kernels. The caches key on the graph, the torch version and the
    compiler's settings, so a changed model or PyTorch compiles afresh."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))  # read at the first compile, not at import
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True


def compile_decoder_layers(model, cuda_graphs: bool) -> None:
    """torch.compile each decoder layer in place (the adapter's keys stay as they are). The layers share their code,
    so they share one compiled graph (regional compilation: one layer's compile time, not the model's); row lengths
    are dynamic from the start, so a new packed length compiles nothing. With ``cuda_graphs`` (reduce-overhead
    mode), each layer's forward and backward replay as CUDA graphs, one recorded per row length (hence padded rows);
    on a CPU that mode compiles as the default one."""
    keep_compile_caches()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mode = "reduce-overhead" if cuda_graphs else None
    for layer in base.get_decoder().layers:
        layer.compile(dynamic=True, mode=mode)


class CudaGraphSteps(TrainerCallback):
    """Tells CUDA graph trees where each optimiser step begins, so that a step's replays may reuse the memory of the
    previous step's outputs (its activations and gradients are dead by then)."""

    def on_step_begin(self, args, state, control, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
