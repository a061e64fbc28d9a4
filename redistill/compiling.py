"""train.compile: the decoder layers compiled in place, with the compiler's caches on disk so that compiling is paid
once per machine and model, not once per run."""

import os
from pathlib import Path

import torch

from redistill.models import decoder_of

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


def compile_decoder_layers(model) -> None:
    """torch.compile each decoder layer in place (the adapter's keys stay as they are). The layers share their code,
    so they share one compiled graph (regional compilation: one layer's compile time, not the model's); row lengths
    are dynamic from the start, so a new packed length compiles nothing."""
    keep_compile_caches()
    for layer in decoder_of(model).layers:
        layer.compile(dynamic=True)
