"""The pipeline through real DVC: `make demo` in a fresh git repository, no-op re-runs, targeted re-runs."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from redistill import paths

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
    return re.findall(r"-S (\S+)", (ROOT / "Makefile").read_text().split("DEMO_PARAMS :=")[1].split("\n\n")[0])


def sh(*command: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture
def repo(tmp_path):
    """A fresh git repository holding the project's files, as a clone would."""
    for name in PROJECT_FILES:
        source, target = ROOT / name, tmp_path / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "parts"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    sh("git", "init", "-q", cwd=tmp_path)
    sh("git", "add", "-A", cwd=tmp_path)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project", cwd=tmp_path)
    return tmp_path


def make_demo(repo: Path) -> str:
    # -o: the venv running these tests is already set up; don't rebuild it from the copied requirements.
    return sh("make", "-o", f"{VENV}/.installed", "demo", f"VENV={VENV}", cwd=repo)


def test_dvc_yaml_declares_the_paths_the_stages_write():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def declared(stage: str) -> set[str]:
        entries = stages[stage].get("outs", []) + stages[stage].get("metrics", [])
        return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries}

    assert declared("sample") == {str(paths.SENTENCES), "metrics/sample.json"}
    assert declared("synthesize") == {str(paths.LABELED), str(paths.TEACHER_JOURNAL), "metrics/synthesize.json"}
    assert declared("split") == {str(path) for path in paths.SPLITS.values()} | {"metrics/split.json"}


def overrides(*params: str) -> list[str]:
    return [arg for param in params for arg in ("-S", param)]


@pytest.mark.slow
def test_make_demo_runs_offline_and_the_finetuned_student_wins(repo):
    output = make_demo(repo)
    assert ran(output) == ["sample", "synthesize", "split", "import_model", "train", "evaluate"]
    for name in ("sentences", "labeled", "train", "val", "test", "predictions"):
        assert (repo / "data" / f"{name}.jsonl").stat().st_size > 0
    for name in ("sample", "synthesize", "split", "train", "eval", "f1"):
        assert (repo / "metrics" / f"{name}.json").is_file()
    assert (repo / "models/adapter/adapter_model.safetensors").is_file()
    scores = json.loads((repo / "metrics/eval.json").read_text())
    assert scores["finetuned"]["exact"]["f1"] > scores["base"]["exact"]["f1"]
    assert (repo / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()  # the real run's params stay

    assert ran(make_demo(repo)) == []  # nothing changed: nothing runs

    output = sh("dvc", "exp", "run", *overrides(*demo_params(), "evaluate.max_new_tokens=64"), cwd=repo)
    assert ran(output) == ["evaluate"]
    assert "evaluate.max_new_tokens" in sh("dvc", "params", "diff", "HEAD", cwd=repo)
    assert "Training loss" in sh("dvc", "plots", "show", "--json", cwd=repo)


@pytest.mark.slow
def test_changing_the_split_seed_reruns_split_and_what_depends_on_it(repo, tiny_student):
    tiny = (
        f"student.model={tiny_student}",
        "import_model.gguf=null",
        "train.lora.r=4",
        "train.lora.alpha=8",
        "train.epochs=1",
        "evaluate.max_new_tokens=8",
    )
    output = sh("dvc", "exp", "run", *overrides(*demo_params(), *tiny), cwd=repo)
    assert ran(output) == ["sample", "synthesize", "split", "import_model", "train", "evaluate"]
    assert ran(sh("dvc", "exp", "run", *overrides(*demo_params(), *tiny), cwd=repo)) == []
    output = sh("dvc", "exp", "run", *overrides(*demo_params(), *tiny, "split.seed=3"), cwd=repo)
    assert ran(output) == ["split", "train", "evaluate"]
    dag = sh("dvc", "dag", cwd=repo)
    for upstream, downstream in [("sample", "synthesize"), ("synthesize", "split"), ("split", "train")]:
        assert dag.index(upstream) < dag.index(downstream)
