"""What the tests of a Triton kernel share: the kernel runs on a GPU, or on the CPU under Triton's interpreter.
Triton's interpreter must be chosen before Triton is imported, and pytest's other modules import it (through trl):
on a CPU a kernel's tests run in a process of their own, which the module's `test_under_tritons_interpreter` starts
through `run_under_interpreter`."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
runs_here = pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED, reason="the kernel runs here as it is")


@pytest.fixture
def kernel_device() -> str:
    """Where the kernel runs: the GPU, else the CPU under Triton's interpreter."""
    if not torch.cuda.is_available() and not INTERPRETED:
        pytest.skip("runs under Triton's interpreter, in the process that test_under_tritons_interpreter starts")
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_under_interpreter(test_module: str) -> None:
    """``test_module``'s tests, on the CPU, in a process where Triton starts in its interpreter; all must pass."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_module]
    result = subprocess.run(
        command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
