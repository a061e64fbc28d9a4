"""The pipeline through real DVC: `make demo` in a fresh git repository, no-op re-runs, targeted re-runs."""

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from dvc_repo import make_repo, overrides, ran, sh, tiny_params

from redistill import paths
from redistill.demo import demo_pipeline


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
    assert declared("import_model") == {str(paths.BASE_MODEL)}
    assert declared("train") == {str(paths.ADAPTER), str(paths.TRAIN_LOG), str(paths.METRICS / "train.json")}
    assert declared("evaluate") == {
        str(paths.PREDICTIONS),
        str(paths.TEST_GRAPH),
        str(paths.ERRORS),
        str(paths.METRICS / "eval.json"),
        str(paths.F1_PLOT),
        str(paths.ANSWERS_PLOT),
    }
    assert declared("evaluate_teacher") == {str(paths.TEACHER_PREDICTIONS), str(paths.METRICS / "eval_teacher.json")}


def run_time_nodes(tree: ast.AST):
    """The nodes of ``tree`` but those under ``if TYPE_CHECKING:``, whose imports never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from run_time_nodes(node)


def imported_files(script: Path) -> set[str]:
    """The package's files that ``script`` imports, directly or through other package files, lazily or not."""
    found: set[str] = set()
    todo = [script]
    while todo:
        for node in run_time_nodes(ast.parse(todo.pop().read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                # redistill.teacher.sdk -> redistill/__init__.py, teacher/__init__.py, teacher/sdk.py
                for end in range(1, len(parts) + 1):
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


def params_read_by(script: Path) -> set[str]:
    """The params a stage script reads: each block it loads, and teacher.system_prompt through teacher_prompt()."""
    read = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "load_block":
                read.add(node.args[1].value)
            elif node.func.id == "teacher_prompt":
                read.add("teacher.system_prompt")
    return read


def test_each_stage_depends_on_exactly_the_params_it_reads():
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        assert set(stage["params"]) == params_read_by(ROOT / f"stages/{name}.py"), name


def test_the_demo_runs_the_projects_pipeline_on_params_with_the_same_keys():
    assert yaml.safe_load((ROOT / "demo/dvc.yaml").read_text()) == demo_pipeline(
        yaml.safe_load((ROOT / "dvc.yaml").read_text())
    ), "demo/dvc.yaml is stale: run `make demo/dvc.yaml`"

    def keys(block: dict, prefix: str = "") -> set[str]:
        return {
            name
            for key, value in block.items()
            for name in ({f"{prefix}{key}"} | (keys(value, f"{prefix}{key}.") if isinstance(value, dict) else set()))
        }

    real, demo = (yaml.safe_load((ROOT / folder / "params.yaml").read_text()) for folder in (".", "demo"))
    assert keys(demo) == keys(real)


@pytest.mark.slow
def test_changing_the_split_seed_reruns_split_and_what_depends_on_it(repo, tiny_student):
    demo = repo / "demo"
    output = sh("dvc", "exp", "run", *overrides(*tiny_params(tiny_student)), cwd=demo)
    assert ran(output) == ["sample", "synthesize", "split", "import_model", "train", "evaluate", "evaluate_teacher"]
    assert ran(sh("dvc", "exp", "run", *overrides(*tiny_params(tiny_student)), cwd=demo)) == []
    output = sh("dvc", "exp", "run", *overrides(*tiny_params(tiny_student), "split.seed=3"), cwd=demo)
    assert ran(output) == ["split", "train", "evaluate", "evaluate_teacher"]
    dag = sh("dvc", "dag", cwd=demo)
    for upstream, downstream in [("sample", "synthesize"), ("synthesize", "split"), ("split", "train")]:
        assert dag.index(upstream) < dag.index(downstream)
