"""The offline demo's workspace, demo/: a DVC project of its own inside the repository.

Its pipeline is the project's, run on demo/params.yaml, so the demo never writes the real run's params.yaml or
dvc.lock, and every DVC command works in it offline. `python -m redistill.demo pipeline` writes demo/dvc.yaml from
dvc.yaml (the Makefile does when dvc.yaml changes); `python -m redistill.demo summary` prints where the demo's
results are and what to try next.
"""

import json
import sys
from pathlib import Path

import yaml

WORKSPACE = Path("demo")
CODE = ("stages/", "redistill/")  # what the demo's stages run and depend on, one folder up
HEADER = """\
# Written by `make demo` from ../dvc.yaml (python -m redistill.demo pipeline): edit that file, not this one.
# The same stages on the demo's params.yaml; the code they run is the project's, one folder up.
"""


def _shared(path: str) -> str:
    return f"../{path}" if path.startswith(CODE) else path


def demo_pipeline(pipeline: dict) -> dict:
    """dvc.yaml's stages, with the code they run and depend on reached from demo/."""
    stages = {}
    for name, stage in pipeline["stages"].items():
        program, script = stage["cmd"].split(" ", 1)
        stages[name] = stage | {"cmd": f"{program} {_shared(script)}", "deps": [_shared(dep) for dep in stage["deps"]]}
    return pipeline | {"stages": stages}


def write_pipeline(root: Path = Path()) -> Path:
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    target = root / WORKSPACE / "dvc.yaml"
    target.write_text(HEADER + yaml.safe_dump(demo_pipeline(pipeline), sort_keys=False, width=120), encoding="utf-8")
    return target


def summary(workspace: Path = WORKSPACE) -> str:
    """Scores, where the outputs are, and three things to try."""
    scores = json.loads((workspace / "metrics/eval.json").read_text(encoding="utf-8"))
    lines = ["", "The demo's student on its test split:"]
    for name, values in scores.items():
        lines.append(
            f"  {name:10} exact F1 {values['exact']['f1']:.3f}  lenient F1 {values['lenient']['f1']:.3f}  "
            f"well-formed {values['well_formed_share']:.0%}  ended at EOS {values['ended_at_eos_share']:.0%}"
        )
    lines += [
        "",
        f"Results, in {workspace}/:",
        "  metrics/eval.json        every score per model (dvc metrics show)",
        "  data/predictions.jsonl   each test sentence with the teacher's triples and every model's answer",
        "  models/adapter/          the trained LoRA adapter, tokenizer and chat template",
        "",
        f"Three things to try (cd {workspace}; source ../.venv/bin/activate):",
        "  dvc exp run -S train.epochs=3   # train longer: re-runs train and evaluate only",
        "  dvc metrics diff demo           # then compare with this run, recorded as experiment `demo`",
        "  dvc plots show                  # loss per example seen, F1 per model: dvc_plots/index.html, offline",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    command = sys.argv[1:] or ["summary"]
    if command == ["pipeline"]:
        write_pipeline()
    elif command == ["summary"]:
        print(summary())
    else:
        sys.exit("usage: python -m redistill.demo [pipeline | summary]")
