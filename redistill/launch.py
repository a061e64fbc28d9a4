"""Run a stage script on several processes of one host through `accelerate launch`: DDP, or FSDP for a student
that does not fit one GPU. The launched processes run the same script; the trainer shards the data among them."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from redistill.errors import PipelineError

STRATEGIES = ("ddp", "fsdp")

# The published FSDP+QLoRA recipe (Answer.AI with bitsandbytes; peft's examples/sft/configs/fsdp_config_qlora.yaml),
# with the parameters kept on the GPUs. For CPU offload, or several hosts, give an accelerate config file instead.
FSDP_FLAGS = [
    "--use_fsdp",
    "--fsdp_version=1",
    "--fsdp_sharding_strategy=FULL_SHARD",
    "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP",
    "--fsdp_backward_prefetch=BACKWARD_PRE",
    "--fsdp_state_dict_type=SHARDED_STATE_DICT",
    "--fsdp_cpu_ram_efficient_loading=true",
    "--fsdp_sync_module_states=true",
    "--fsdp_use_orig_params=false",
    "--fsdp_offload_params=false",
]


def is_launched() -> bool:
    """True in a process that `accelerate launch` (torchrun) started."""
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def uses_fsdp() -> bool:
    """True in a process that accelerate launched with FSDP (from train.distributed or a config file)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def launch_command(script: str, num_processes: int, strategy: str, config_file: str | None) -> list[str]:
    """`accelerate launch` for ``script``: flags from the params, or a config file that the flags then override."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    if config_file:
        command += ["--config_file", config_file]
        if num_processes > 1:
            command += ["--num_processes", str(num_processes)]
    else:
        command += ["--num_machines", "1", "--num_processes", str(num_processes), "--dynamo_backend", "no"]
        # The trainer sets the precision from train.precision; accelerate must not add its own.
        command += ["--mixed_precision", "no"]
        command += FSDP_FLAGS if strategy == "fsdp" else ["--multi_gpu"]
    # A free port of our own, so that two runs on one host (or two test workers) never meet.
    command += ["--main_process_port", str(_free_port()), script]
    return command


def launch(script: str, num_processes: int, strategy: str, config_file: str | None) -> None:
    """Run ``script`` under `accelerate launch` and wait; a failed process is a PipelineError."""
    if config_file and not Path(config_file).is_file():
        raise PipelineError(f"train.accelerate_config: no file at {config_file}")
    command = launch_command(script, num_processes, strategy, config_file)
    returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise PipelineError(
            f"train: a process launched by accelerate failed (exit {returncode}); its error is printed above"
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
