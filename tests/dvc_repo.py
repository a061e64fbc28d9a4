"""Helpers for tests that run the pipeline through real DVC in fresh git repositories."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

VENV = Path(sys.executable).parent.parent
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "Makefile",
    "requirements.txt",
    "pyproject.toml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "stages",
    "redistill",
    "data/demo",
]


def demo_params() -> list[str]:
    """The `-S key=value` overrides that `make demo` passes, read from the Makefile."""
    block = (ROOT / "Makefile").read_text().split("DEMO_PARAMS :=")[1].split("\n\n")[0].replace("\\\n", " ")
    words = shlex.split(block)
    return [value for flag, value in zip(words[::2], words[1::2], strict=True) if flag == "-S"]


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "redistill tests",
    "GIT_AUTHOR_EMAIL": "tests@localhost",
    "GIT_COMMITTER_NAME": "redistill tests",
    "GIT_COMMITTER_EMAIL": "tests@localhost",
}


def sh(*command: str, cwd: Path, env: dict | None = None) -> str:
    env = {**os.environ, **GIT_IDENTITY, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def make_repo(folder: Path) -> Path:
    """A fresh git repository holding the project's files, as a clone would, with a remote of its own."""
    for name in PROJECT_FILES:
        source, target = ROOT / name, folder / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "parts"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    sh("git", "init", "-q", cwd=folder)
    sh("git", "add", "-A", cwd=folder)
    sh("git", "commit", "-qm", "project", cwd=folder)
    # Each test repository pushes to its own default remote, not to the shared one beside the checkout.
    sh("dvc", "remote", "modify", "--local", "local", "url", str(folder.parent / f"{folder.name}-remote"), cwd=folder)
    return folder


def make_demo(repo: Path) -> str:
    # -o: the venv running these tests is already set up; don't rebuild it from the copied requirements.
    return sh("make", "-o", f"{VENV}/.installed", "demo", f"VENV={VENV}", cwd=repo)


def overrides(*params: str) -> list[str]:
    """`-S` arguments for `dvc exp run`."""
    return [arg for param in params for arg in ("-S", param)]


def tiny_params(student: Path) -> tuple[str, ...]:
    """Overrides on top of the demo's that swap SmolLM2 for the tiny random Llama: the pipeline in seconds."""
    return (
        f"student.model={student}",
        "import_model.gguf=null",
        "train.lora.r=4",
        "train.lora.alpha=8",
        "train.epochs=1",
        "evaluate.max_new_tokens=8",
    )
