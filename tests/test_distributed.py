"""The train stage on several processes: `accelerate launch`, data sharding, and only the main process writing."""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from test_training import run_stage, tiny_project
from torch.utils.data import BatchSampler

from redistill.errors import PipelineError
from redistill.launch import FSDP_FLAGS, launch, launch_command
from redistill.models import load_base, load_trained
from redistill.training import EpochSeededLengthGroupedSampler

# Installed in each launched process through PYTHONPATH: the process of rank 1 logs every file it creates,
# writes, renames or removes under the working directory (Python-level file operations, which is how every
# output of the stage is written).
WRITES_LOGGER = """
import os, sys

if os.environ.get("RANK") == "1":
    _log = open(os.environ["RANK1_WRITES"], "a")
    _root = os.getcwd()
    _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _target(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _writes)
            return path if writing else None
        if event in ("os.rename", "os.replace"):
            return args[1]
        if event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            return args[0]
        return None

    def _audit(event, args):
        path = _target(event, args)
        if path is None or isinstance(path, int):
            return
        full = os.path.abspath(os.fsdecode(path))
        if full.startswith(_root + os.sep):
            _log.write(os.path.relpath(full, _root) + "\\n")
            _log.flush()

    sys.addaudithook(_audit)
"""


def test_launch_command_for_ddp_fsdp_and_a_config_file():
    ddp = launch_command("stages/train.py", 4, "ddp", None)
    assert ddp[1:5] == ["-m", "accelerate.commands.launch", "--quiet", "--num_machines"]
    assert "--multi_gpu" in ddp and ddp[ddp.index("--num_processes") + 1] == "4" and ddp[-1] == "stages/train.py"
    assert not set(FSDP_FLAGS) & set(ddp)

    fsdp = launch_command("stages/train.py", 2, "fsdp", None)
    assert "--multi_gpu" not in fsdp and set(FSDP_FLAGS) <= set(fsdp)

    configured = launch_command("stages/train.py", 1, "ddp", "fsdp.yaml")
    assert configured[configured.index("--config_file") + 1] == "fsdp.yaml"
    assert "--num_processes" not in configured and "--multi_gpu" not in configured, "the file decides"
    assert "--num_processes" in launch_command("stages/train.py", 8, "ddp", "fsdp.yaml"), "the param overrides it"

    ports = {launch_command("x.py", 2, "ddp", None)[-2] for _ in range(5)}
    assert len(ports) > 1, "each launch picks its own free port"


def test_a_missing_accelerate_config_is_one_clear_error():
    with pytest.raises(PipelineError, match=r"train.accelerate_config: no file at nowhere\.yaml"):
        launch("stages/train.py", 1, "ddp", "nowhere.yaml")


def test_length_grouped_order_is_the_same_on_every_process_and_shards_partition_each_epoch():
    lengths = [int(n) for n in torch.randint(20, 200, (64,), generator=torch.Generator().manual_seed(0))]
    seen = {0: [], 1: []}
    for rank in (0, 1):
        torch.manual_seed(1000 + rank)  # each process's global RNG drifts its own way during training
        sampler = EpochSeededLengthGroupedSampler(8, lengths=lengths, seed=17)
        shard = BatchSamplerShard(BatchSampler(sampler, 4, drop_last=False), num_processes=2, process_index=rank)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            seen[rank].append([index for batch in shard for index in batch])
    for epoch in range(3):
        assert sorted(seen[0][epoch] + seen[1][epoch]) == list(range(64)), "every example once per epoch"
    assert seen[0][0] != seen[0][1], "each epoch has its own order"


def test_two_processes_shard_the_data_and_only_the_main_process_writes(project, tmp_path, tiny_student, monkeypatch):
    tiny_project(project, tmp_path, tiny_student, train__batch_size=2, train__save_steps=3)
    single = run_stage("train")
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads(Path("metrics/train.json").read_text())
    for output in ("metrics/train.json", "metrics/train", "models/adapter"):
        shutil.rmtree(output) if Path(output).is_dir() else Path(output).unlink()

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(WRITES_LOGGER))
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("RANK1_WRITES", str(tmp_path / "rank1-writes.log"))
    project(train__num_processes=2)
    double = run_stage("train")
    assert double.returncode == 0, double.stderr[-3000:]
    two = json.loads(Path("metrics/train.json").read_text())

    # Each process takes half of every epoch: half the optimiser steps, the same examples and tokens in all.
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert (one["global_batch_size"], two["global_batch_size"]) == (2, 4)
    assert one["steps"] == 16 and two["steps"] == 8
    assert two["tokens_seen"] == one["tokens_seen"] and two["examples"] == one["examples"] == 16
    assert two["final_loss"] < 100 and two["eval_loss"] is not None and two["tokens_per_second_after_warmup"] > 0

    # The main process wrote every output, once; rank 1 only wrote its share of the checkpoints (now removed).
    rank1_writes = Path(tmp_path / "rank1-writes.log").read_text().split()
    assert rank1_writes, "the logger saw rank 1 at work (it writes its RNG state into each checkpoint)"
    assert all(path.startswith("models/checkpoints/") for path in rank1_writes), rank1_writes
    assert sorted(path.name for path in Path("models").iterdir()) == ["adapter"], "no checkpoints, no temp folders"
    loss_log = Path("metrics/train/plots/metrics/loss.tsv").read_text().splitlines()
    # DVCLive's step is the examples seen: 4 a step (2 per process), 16 an epoch.
    assert [line.split("\t")[0] for line in loss_log[1:]] == [str(4 * step) for step in range(1, 9)]
    base = load_base(str(tiny_student), torch.float32, "cpu").state_dict()
    tuned = load_trained("models/adapter", device="cpu").model.state_dict()
    changed = {name for name, weight in tuned.items() if not torch.equal(weight, base[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed), "the adapter trained the LoRA targets"


def test_a_failure_in_the_launched_processes_is_one_line_and_writes_nothing(project, tmp_path, tiny_student):
    tiny_project(project, tmp_path, tiny_student, train__num_processes=2, train__max_seq_length=16)
    result = run_stage("train")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: train: a process launched by accelerate failed (exit 1); its error is printed above"
    assert "error: train.max_seq_length (16) is shorter than the prompt" in result.stderr
    assert not Path("metrics/train.json").exists() and not Path("models/adapter").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP needs GPUs, and this machine has them")
def test_fsdp_without_gpus_is_one_clear_error(project, tmp_path, tiny_student):
    tiny_project(project, tmp_path, tiny_student, train__num_processes=2, train__distributed="fsdp")
    result = run_stage("train")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: train.distributed: fsdp needs CUDA GPUs; use ddp on CPU"
