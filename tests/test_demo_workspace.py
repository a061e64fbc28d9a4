"""The demo is a DVC workspace of its own (demo/): every DVC command the README shows works there offline, no
interruption can change any params.yaml, and a failed stage loses nothing that `dvc checkout` can't restore."""

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from browser import open_page
from dvc_repo import GIT_IDENTITY, VENV, edit_params, make_demo, make_repo, make_tiny_demo, ran, sh

from redistill.io import read_jsonl

pytestmark = pytest.mark.slow
STAGES = ["sample", "synthesize", "split", "import_model", "train", "evaluate", "evaluate_teacher"]
# Lines that once buried the demo's own output: DVC's first `exp run`, bitsandbytes' Hub kernel, a transformers
# deprecation that trl triggers, and the trainer's per-step dicts.
NOISE = ["No file hash info found", "kernels-community", "FutureWarning", "{'loss'"]
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
PLOTS_DRAWN = "return document.querySelectorAll('.vega-embed .marks').length"  # one canvas or svg of marks a plot


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for sub in ("data", "models", "metrics")
        for path in sorted((folder / sub).rglob("*"))
        if path.is_file() and path.name != ".gitignore"
    }


def test_make_demo_trains_smollm2_offline_quietly_and_draws_its_plots_offline(tmp_path, chromium):
    """Then the README's next steps: the trained student on your own text, merged, and the graph it finds."""
    repo = make_repo(tmp_path / "project")
    output = make_demo(repo)
    assert ran(output) == STAGES
    for noise in NOISE:
        assert noise not in output
    demo = repo / "demo"
    scores = json.loads((demo / "metrics/eval.json").read_text())
    assert scores["finetuned"]["exact"]["f1"] > scores["base"]["exact"]["f1"]
    assert "metrics/eval.json" in output and "dvc exp run -S train.epochs=3" in output  # where results are, what next
    assert not (repo / "dvc.lock").exists() and not (repo / "data").exists()  # the real run's workspace: untouched
    assert sh("git", "status", "--porcelain", "--", "params.yaml", "dvc.yaml", "demo/params.yaml", cwd=repo) == ""
    assert ran(make_demo(repo)) == []  # nothing changed: nothing runs

    sh("dvc", "plots", "show", cwd=demo)
    page = demo / "dvc_plots/index.html"
    visit = open_page(chromium, page, ready_script=f"{PLOTS_DRAWN} >= 3")
    assert visit.console_errors == []
    assert visit.network_requests == []
    assert chromium.execute_script(PLOTS_DRAWN) == 3  # the curated plots, not one per logged metric

    notes = tmp_path / "notes.txt"
    notes.write_text(
        "Marie Curie was born in Warsaw in 1867 and moved to Paris.\n"
        "The U.S. Army was founded in 1775 by the Continental Congress. It grew.\n"
    )
    sh("redistill", "extract", str(notes), "-o", "triples.jsonl", cwd=demo)
    extracted = read_jsonl(demo / "triples.jsonl")
    assert [record["source"] for record in extracted] == [f"{notes}:1", f"{notes}:2", f"{notes}:2"]
    assert all(record["triples"] for record in extracted[:2])  # the trained student answers in triples
    sh("redistill", "merge", "-o", "models/merged", cwd=demo)
    sh("redistill", "extract", str(notes), "--model", "models/merged", "-o", "merged.jsonl", cwd=demo)
    assert all(record["triples"] for record in read_jsonl(demo / "merged.jsonl")[:2])
    sh("redistill", "graph", "triples.jsonl", "-o", "kg", cwd=demo)
    assert (demo / "kg.graphml").is_file()
    visit = open_page(chromium, demo / "kg.html")
    assert visit.console_errors == [] and visit.network_requests == []


def test_every_dvc_command_the_readme_shows_works_after_the_demo(tmp_path, tiny_student):
    repo = make_repo(tmp_path / "project")
    make_tiny_demo(repo, tiny_student)
    real_params = (repo / "params.yaml").read_bytes()
    assert ran(make_demo(repo)) == STAGES
    demo = repo / "demo"

    assert ran(sh("dvc", "repro", cwd=demo)) == []
    assert "up to date" in sh("dvc", "status", cwd=demo)
    assert ran(sh("dvc", "exp", "run", "-S", "train.epochs=3", cwd=demo)) == ["train", "evaluate"]
    columns = "Experiment|train\\.epochs|eval_loss|.*exact\\.f1"  # as the README shows it
    table = sh("dvc", "exp", "show", "--drop", ".*", "--keep", columns, cwd=demo, env={"COLUMNS": "100"})
    assert "[demo]" in table and "train.epochs" in table and "finetuned.exact.f1" in table and "…" not in table
    diff = sh("dvc", "metrics", "diff", "demo", cwd=demo)
    assert "metrics/train.json" in diff and "epochs" in diff
    assert "train.epochs" in sh("dvc", "params", "diff", "demo", cwd=demo)
    sh("dvc", "plots", "show", cwd=demo)
    assert (demo / "dvc_plots/index.html").is_file()

    sh("dvc", "push", cwd=demo)
    pushed = digests(demo)
    for folder in ("models", "data", ".dvc/cache"):
        subprocess.run(["rm", "-rf", str(demo / folder)], check=True)
    sh("dvc", "pull", cwd=demo)
    assert digests(demo) == {name: value for name, value in pushed.items() if not name.startswith("models/check")}
    assert ran(sh("dvc", "repro", cwd=demo)) == []
    assert (repo / "params.yaml").read_bytes() == real_params


def test_a_failed_stage_loses_nothing_that_dvc_checkout_cannot_restore(tmp_path, tiny_student):
    repo = make_repo(tmp_path / "project")
    make_tiny_demo(repo, tiny_student)
    make_demo(repo)
    demo = repo / "demo"
    good = digests(demo)

    edit_params(demo / "params.yaml", train__epochs="two")  # a typo
    env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    failed = subprocess.run(["dvc", "repro"], cwd=demo, env=env, capture_output=True, text=True)
    assert failed.returncode != 0
    assert "error: params.yaml: train.epochs must be a number, got 'two'" in failed.stdout + failed.stderr
    assert set(digests(demo)) < set(good)  # DVC removed the stage's outputs before running it

    sh("dvc", "checkout", cwd=demo)
    assert digests(demo) == good  # adapter, train metrics and the per-step log all back


def reap_group(group: int) -> None:
    """Wait until every process of the group is gone. The test adopts the group's orphans and reaps them, as a
    terminal's init would: a zombie still counts as alive for DVC's lock, and a container's init may not reap."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"process group {group} still alive")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_no_interruption_of_make_demo_changes_any_params(tmp_path, tiny_student, signum):
    repo = make_repo(tmp_path / "project")
    make_tiny_demo(repo, tiny_student)
    params = {name: (repo / name).read_bytes() for name in ("params.yaml", "demo/params.yaml")}
    env = {**os.environ, **GIT_IDENTITY, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the killed group come to this process
    make = subprocess.Popen(
        ["make", "-o", f"{VENV}/.installed", "demo", f"VENV={VENV}"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, which a closed terminal or Ctrl-C signals as a whole
        # A terminal's defaults, whatever this test inherited: nohup ignores SIGHUP, and a shell's background job
        # ignores SIGINT, and make would then run to the end.
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)],
    )
    for line in make.stdout:
        if "Running stage 'train'" in line:
            break
    os.killpg(make.pid, signum)
    make.communicate(timeout=120)
    assert make.returncode != 0
    reap_group(make.pid)
    assert {name: (repo / name).read_bytes() for name in params} == params

    assert "train" in ran(make_demo(repo))  # the next run picks up where this one stopped
    assert {name: (repo / name).read_bytes() for name in params} == params
