"""The pipeline through real DVC: `make demo` in a fresh git repository, no-op re-runs, targeted re-runs."""

import ast
import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from dvc_repo import demo_params, make_demo, make_repo, overrides, ran, sh, tiny_params

from redistill import paths


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "project")


def test_dvc_yaml_declares_the_paths_the_stages_write():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def declared(stage: str) -> set[str]:
        entries = stages[stage].get("outs", []) + stages[stage].get("metrics", [])
        return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries}

    assert declared("sample") == {str(paths.SENTENCES), "metrics/sample.json"}
    assert declared("synthesize") == {str(paths.LABELED), str(paths.TEACHER_JOURNAL), "metrics/synthesize.json"}
    assert declared("split") == {str(path) for path in paths.SPLITS.values()} | {"metrics/split.json"}


def imported_files(script: Path) -> set[str]:
    """The package's files that ``script`` imports, directly or through other package files, lazily or not."""
    found: set[str] = set()
    todo = [script]
    while todo:
        for node in ast.walk(ast.parse(todo.pop().read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                # redistill.teacher.sdk -> teacher/__init__.py, teacher/sdk.py (redistill/__init__.py is a docstring)
                for end in range(2, len(parts) + 1):
                    base = ROOT.joinpath(*parts[:end])
                    for candidate in (base / "__init__.py", base.with_suffix(".py")):
                        relative = str(candidate.relative_to(ROOT))
                        if parts[0] == "redistill" and candidate.is_file() and relative not in found:
                            found.add(relative)
                            todo.append(candidate)
    return found


def test_each_stage_depends_on_exactly_the_code_it_imports():
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        code = {dep for dep in stage["deps"] if dep.startswith(("stages/", "redistill/")) and dep.endswith(".py")}
        assert code == {f"stages/{name}.py"} | imported_files(ROOT / f"stages/{name}.py"), name


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
    tiny = tiny_params(tiny_student)
    output = sh("dvc", "exp", "run", *overrides(*demo_params(), *tiny), cwd=repo)
    assert ran(output) == ["sample", "synthesize", "split", "import_model", "train", "evaluate"]
    assert ran(sh("dvc", "exp", "run", *overrides(*demo_params(), *tiny), cwd=repo)) == []
    output = sh("dvc", "exp", "run", *overrides(*demo_params(), *tiny, "split.seed=3"), cwd=repo)
    assert ran(output) == ["split", "train", "evaluate"]
    dag = sh("dvc", "dag", cwd=repo)
    for upstream, downstream in [("sample", "synthesize"), ("synthesize", "split"), ("split", "train")]:
        assert dag.index(upstream) < dag.index(downstream)
