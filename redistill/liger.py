"""Liger's fused Triton kernels (RMSNorm, SwiGLU, rotary) in place of a model's own: `train.liger_kernels` when
training, `evaluate.liger_kernels` and `redistill extract --liger-kernels` when decoding. Triton's kernels, so a CUDA
GPU only, with the liger-kernel package (requirements-gpu.txt)."""

import importlib.util


def liger_runs_here() -> bool:
    """Whether Liger's kernels can run: a CUDA GPU and the liger-kernel package (requirements-gpu.txt)."""
    return liger_problem("") is None


def liger_problem(setting: str) -> str | None:
    """Why ``setting`` (a param or option that turns Liger's kernels on) can't run here, as one line; None if it can."""
    import torch  # here, not at import: params are read without it

    if not torch.cuda.is_available():
        return f"{setting} needs a CUDA GPU (Liger's kernels are Triton's); leave it off here"
    if importlib.util.find_spec("liger_kernel") is None:
        return f"{setting} needs the liger-kernel package: pip install -r requirements-gpu.txt"
    return None


def use_liger_kernels(model) -> None:
    """``model``'s norms, MLPs and rotary embedding swapped for Liger's kernels, in place (a LoRA model's too). The
    loss stays the model's own: the trainer computes it over the answers only."""
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(model, {"cross_entropy": False, "fused_linear_cross_entropy": False})
