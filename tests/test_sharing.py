"""Sharing through a DVC remote, and the pipeline's incremental and reproducibility guarantees.

A real S3 API server (moto in server mode) runs on loopback; the pipeline runs in the demo's workspace (demo/), or
at the root on the demo's params, with the tiny random Llama as student, so each full run takes seconds.
"""

import hashlib
import shutil
import time
from pathlib import Path

import boto3
import pytest
from dvc_repo import VENV, demo_params_at_root, make_repo, overrides, ran, sh, tiny_params
from fake_provider import FakeProvider

pytestmark = pytest.mark.slow
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "redistill",
    "AWS_SECRET_ACCESS_KEY": "redistill",
    "AWS_DEFAULT_REGION": "us-east-1",
}
ALL_STAGES = ["sample", "synthesize", "split", "import_model", "train", "evaluate", "evaluate_teacher"]
OUTPUTS = [
    "data/sentences.jsonl",
    "data/labeled.jsonl",
    "data/teacher_journal.jsonl",
    "data/train.jsonl",
    "data/val.jsonl",
    "data/test.jsonl",
    "data/predictions.jsonl",
    "models/adapter/adapter_model.safetensors",
    "models/adapter/adapter_config.json",
    "models/base/IMPORT.json",
]


@pytest.fixture
def s3(monkeypatch):
    """An S3-compatible server on loopback with an empty bucket; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="redistill")
    yield endpoint
    server.stop()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def commit(repo: Path, message: str) -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", message, cwd=repo)


def run_tiny(workspace: Path, student: Path, *extra: str, env: dict | None = None) -> str:
    return sh("dvc", "exp", "run", *overrides(*tiny_params(student), *extra), cwd=workspace, env=env)


def test_push_to_s3_then_pull_in_a_fresh_clone_needs_no_teacher(tmp_path, s3, tiny_student):
    first = make_repo(tmp_path / "first") / "demo"
    sh("dvc", "remote", "add", "-d", "s3", "s3://redistill/dvc-store", cwd=first)
    sh("dvc", "remote", "modify", "s3", "endpointurl", s3, cwd=first)
    # Labels come from a live (loopback) Groq teacher, which will be gone when the clone trains.
    with FakeProvider(models=("teacher-model",)) as teacher:
        live_teacher = (
            "teacher.provider=groq", "teacher.model=teacher-model", f"teacher.base_url={teacher.url}",
            "teacher.limits.rpm=null", "teacher.limits.tpm=null", "teacher.limits.rpd=null", "sample.limit=40",
            "split.test_size=8", "split.val_size=4",
        )  # fmt: skip
        output = run_tiny(first, tiny_student, *live_teacher, env={"GROQ_API_KEY": "test-key"})
        assert len(teacher.requests) == 40
    assert ran(output) == ALL_STAGES
    commit(first, "a run with labels from the teacher")
    sh("dvc", "push", cwd=first)
    sh("dvc", "push", "--run-cache", cwd=first)

    second = tmp_path / "second" / "demo"
    sh("git", "clone", "-q", str(first.parent), str(second.parent), cwd=tmp_path)
    assert not (second / "data/labeled.jsonl").exists()
    sh("dvc", "pull", cwd=second)
    for name in OUTPUTS:
        assert digest(second / name) == digest(first / name), name
    assert ran(sh("dvc", "repro", cwd=second)) == []
    assert "up to date" in sh("dvc", "status", cwd=second)

    # No key, no teacher: a new training run in the clone uses the pulled labels.
    output = sh("dvc", "exp", "run", "-S", "train.epochs=2", cwd=second, env={"GROQ_API_KEY": "", "OPENAI_API_KEY": ""})
    assert ran(output) == ["train", "evaluate"]

    only_adapter = tmp_path / "only-adapter" / "demo"
    sh("git", "clone", "-q", str(first.parent), str(only_adapter.parent), cwd=tmp_path)
    sh("dvc", "pull", "models/adapter", cwd=only_adapter)
    assert digest(only_adapter / "models/adapter/adapter_model.safetensors") == digest(
        first / "models/adapter/adapter_model.safetensors"
    )
    assert not (only_adapter / "data/labeled.jsonl").exists() and not (only_adapter / "models/base").exists()

    from_run_cache = tmp_path / "from-run-cache" / "demo"
    sh("git", "clone", "-q", str(first.parent), str(from_run_cache.parent), cwd=tmp_path)
    output = sh("dvc", "repro", "--pull", cwd=from_run_cache)
    assert ran(output) == []  # every stage restored from the remote instead of re-run
    for name in OUTPUTS:
        assert digest(from_run_cache / name) == digest(first / name), name


def test_the_real_runs_pipeline_then_make_push_and_make_pull_through_the_default_local_remote(tmp_path, tiny_student):
    first = make_repo(tmp_path / "first")
    demo_params_at_root(first)
    output = run_tiny(first, tiny_student)
    assert ran(output) == ALL_STAGES
    commit(first, "a run of the root pipeline")
    make = ("make", "-o", f"{VENV}/.installed", f"VENV={VENV}")
    sh(*make, "push", cwd=first)
    second = tmp_path / "second"
    sh("git", "clone", "-q", str(first), str(second), cwd=tmp_path)
    # The clone's default remote is the committed relative path; point it at the first clone's remote.
    sh("dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "first-remote"), cwd=second)
    sh(*make, "pull", cwd=second)
    for name in OUTPUTS:
        assert digest(second / name) == digest(first / name), name


def test_incremental_reruns(tmp_path, tiny_student):
    repo = make_repo(tmp_path / "project") / "demo"
    assert ran(run_tiny(repo, tiny_student)) == ALL_STAGES
    commit(repo, "first run")

    started = time.monotonic()
    assert ran(sh("dvc", "repro", cwd=repo)) == []
    assert time.monotonic() - started < 3.0

    assert ran(run_tiny(repo, tiny_student, "evaluate.batch_size=4")) == ["evaluate"]
    assert ran(run_tiny(repo, tiny_student, "split.seed=5")) == ["split", "train", "evaluate", "evaluate_teacher"]

    # A new temperature is a new request for every sentence: synthesize asks again. The replayed answers are the
    # same, so the labels' hash is too, and DVC rightly leaves split and what follows alone; the teacher comparison
    # re-runs, and the GPU evaluation of the students does not.
    output = run_tiny(repo, tiny_student, "split.seed=5", "teacher.temperature=0.7")
    assert ran(output) == ["synthesize", "evaluate_teacher"]

    split_script = repo.parent / "stages/split.py"
    split_script.write_text(split_script.read_text() + "\n# a change to the stage's code\n")
    assert ran(run_tiny(repo, tiny_student, "split.seed=5", "teacher.temperature=0.7"))[0] == "split"


def test_experiments_and_metrics_diff_between_commits(tmp_path, tiny_student):
    repo = make_repo(tmp_path / "project") / "demo"
    run_tiny(repo, tiny_student)
    commit(repo, "baseline")
    output = run_tiny(repo, tiny_student, "train.lora.r=16")
    assert ran(output) == ["train", "evaluate"]
    table = sh("dvc", "exp", "show", "--csv", cwd=repo)
    assert "train.lora.r" in table and "16" in table
    commit(repo, "r=16")
    diff = sh("dvc", "metrics", "diff", "HEAD~1", "HEAD", "--md", cwd=repo)
    assert "metrics/train.json" in diff and "trainable_parameters" in diff
    assert "train.lora.r" in sh("dvc", "params", "diff", "HEAD~1", "HEAD", cwd=repo)


def test_two_runs_give_byte_identical_outputs(tmp_path, tiny_student):
    digests = []
    for name in ("one", "two"):
        repo = make_repo(tmp_path / name) / "demo"
        run_tiny(repo, tiny_student)
        digests.append({output: digest(repo / output) for output in OUTPUTS})
        shutil.rmtree(repo / ".dvc/cache")
    assert digests[0] == digests[1]
