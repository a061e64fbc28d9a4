"""Helpers for tests that run the pipeline through real DVC in fresh git repositories."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT

VENV = Path(sys.executable).parent.parent


def project_files() -> list[str]:
    """What a clone of the project holds: the files git tracks (a new file counts once it is `git add`ed)."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


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
    """A fresh git repository holding the project's files, as a clone would, with remotes of its own."""
    for name in project_files():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    sh("git", "init", "-q", cwd=folder)
    sh("git", "add", "-A", cwd=folder)
    sh("git", "commit", "-qm", "project", cwd=folder)
    # Each test repository pushes to a remote of its own, not to the shared one beside the checkout.
    for workspace in (folder, folder / "demo"):
        remote = folder.parent / f"{folder.name}-remote"
        sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=workspace)
    return folder


def make_demo(repo: Path) -> str:
    # -o: the venv running these tests is already set up; don't rebuild it from the copied requirements.
    return sh("make", "-o", f"{VENV}/.installed", "demo", f"VENV={VENV}", cwd=repo)


def edit_params(params_file: Path, **changes: object) -> None:
    """Set dotted keys (``train__epochs=3`` for train.epochs) in a params.yaml."""
    params = yaml.safe_load(params_file.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        block = params
        for parent in parents:
            block = block[parent]
        block[key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def demo_params_at_root(repo: Path) -> None:
    """The real run's params.yaml replaced by the demo's, its input paths rebased: the root pipeline, offline."""
    (repo / "params.yaml").write_text((repo / "demo/params.yaml").read_text())
    edit_params(
        repo / "params.yaml", sample__source="demo/corpus/dolly.jsonl", teacher__cassette="demo/corpus/cassette.jsonl"
    )


def overrides(*params: str) -> list[str]:
    """`-S` arguments for `dvc exp run`."""
    return [arg for param in params for arg in ("-S", param)]


TINY = {
    "import_model__gguf": None,
    "train__lora__r": 4,
    "train__lora__alpha": 8,
    "train__epochs": 1,
    "evaluate__max_new_tokens": 8,
}


def tiny_params(student: Path) -> tuple[str, ...]:
    """Overrides on top of the demo's that swap SmolLM2 for the tiny random Llama: the pipeline in seconds."""
    values = {"student.model": student, **{key.replace("__", "."): value for key, value in TINY.items()}}
    return tuple(f"{key}={'null' if value is None else value}" for key, value in values.items())


def make_tiny_demo(repo: Path, student: Path) -> None:
    """Write the tiny student into the demo's params.yaml and commit it, so that `make demo` takes seconds."""
    edit_params(repo / "demo/params.yaml", student__model=str(student), **TINY)
    sh("git", "commit", "-qam", "tiny demo", cwd=repo)
