"""The train stage's logic: LoRA or QLoRA supervised fine-tuning of the student with trl's SFTTrainer."""

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.integrations import DVCLiveCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from redistill.errors import PipelineError
from redistill.io import atomic_dir
from redistill.launch import STRATEGIES, is_launched, local_rank, uses_fsdp
from redistill.params import require
from redistill.prompts import training_example
from redistill.student import StudentParams, load_model, load_tokenizer

SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "cosine_with_min_lr")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]

    def validate(self) -> None:
        require(self.r > 0, "train.lora.r", f"must be positive, got {self.r}")
        require(self.alpha > 0, "train.lora.alpha", f"must be positive, got {self.alpha}")
        require(0 <= self.dropout < 1, "train.lora.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainParams:
    epochs: float
    batch_size: int
    grad_accum: int
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    max_grad_norm: float
    optim: str
    gradient_checkpointing: bool
    max_seq_length: int
    packing: bool
    group_by_length: bool
    seed: int
    quantization: str
    precision: str
    max_steps: int
    logging_steps: int
    save_steps: int
    num_processes: int
    distributed: str
    accelerate_config: str | None
    lora: LoraParams

    @property
    def needs_launch(self) -> bool:
        """Whether the stage runs as several processes under `accelerate launch`."""
        return self.num_processes > 1 or self.accelerate_config is not None

    def validate(self) -> None:
        require(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        require(self.batch_size > 0, "train.batch_size", f"must be positive, got {self.batch_size}")
        require(self.grad_accum > 0, "train.grad_accum", f"must be positive, got {self.grad_accum}")
        require(self.learning_rate > 0, "train.learning_rate", f"must be positive, got {self.learning_rate}")
        require(
            self.lr_scheduler in SCHEDULERS,
            "train.lr_scheduler",
            f"must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}",
        )
        require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(self.max_grad_norm > 0, "train.max_grad_norm", f"must be positive, got {self.max_grad_norm}")
        require(self.max_seq_length > 0, "train.max_seq_length", f"must be positive, got {self.max_seq_length}")
        require(
            self.quantization in ("nf4", "none"),
            "train.quantization",
            f"must be nf4 or none, got {self.quantization!r}",
        )
        require(self.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}")
        require(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", "must be -1 (whole epochs) or positive")
        require(self.logging_steps > 0, "train.logging_steps", f"must be positive, got {self.logging_steps}")
        require(self.save_steps > 0, "train.save_steps", f"must be positive, got {self.save_steps}")
        require(self.num_processes > 0, "train.num_processes", f"must be positive, got {self.num_processes}")
        require(
            self.distributed in STRATEGIES,
            "train.distributed",
            f"must be one of {', '.join(STRATEGIES)}, got {self.distributed!r}",
        )
        require(
            not (self.distributed == "fsdp" and "8bit" in self.optim),
            "train.optim",
            f"{self.optim} does not work with train.distributed: fsdp (FSDP can't shard bitsandbytes' 8-bit optimiser "
            "states); use adamw_torch",
        )


def check_hardware(params: TrainParams) -> bool:
    """Whether training runs on CUDA; a setting that the hardware can't run is a PipelineError."""
    cuda = torch.cuda.is_available()
    if params.quantization == "nf4" and not cuda:
        raise PipelineError("train.quantization: nf4 needs a CUDA GPU (bitsandbytes 4-bit); set it to none on CPU")
    if "8bit" in params.optim and not cuda:
        raise PipelineError(f"train.optim: {params.optim} needs a CUDA GPU (bitsandbytes); use adamw_torch on CPU")
    if params.distributed == "fsdp" and not cuda:
        raise PipelineError("train.distributed: fsdp needs CUDA GPUs; use ddp on CPU")
    return cuda


def build_examples(tokenizer, records: list[dict], system_prompt: str, max_seq_length: int) -> tuple[list[dict], int]:
    """Tokenised, label-masked examples; those longer than ``max_seq_length`` are dropped and counted."""
    examples, too_long = [], 0
    for record in records:
        example = training_example(tokenizer, record["text"], record["triples"], system_prompt)
        prompt_length = example["labels"].count(-100)
        if prompt_length >= max_seq_length:
            raise PipelineError(
                f"train.max_seq_length ({max_seq_length}) is shorter than the prompt ({prompt_length} tokens for "
                f"sentence {record['id']}); raise it"
            )
        if len(example["input_ids"]) > max_seq_length:
            too_long += 1
        else:
            examples.append(example)
    return examples, too_long


def fingerprint(*parts: object) -> str:
    """A hash of everything that shapes training, so a checkpoint is resumed only by the run that wrote it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def last_checkpoint(checkpoints: Path, expected: str, tidy: bool = True) -> str | None:
    """The newest complete checkpoint of an interrupted run with the same fingerprint. With ``tidy`` (the main
    process), stale and incomplete ones are removed first."""
    if not tidy:
        return _newest(list(checkpoints.glob("checkpoint-*")))
    stamp = checkpoints / "fingerprint.txt"
    if checkpoints.exists() and (not stamp.exists() or stamp.read_text() != expected):
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    stamp.write_text(expected)
    complete = []
    for folder in checkpoints.glob("checkpoint-*"):
        if _is_complete(folder):
            complete.append(folder)
        else:  # killed while saving it; the trainer would choke on it, and rewrites it when it gets there again
            shutil.rmtree(folder)
    return _newest(complete)


def _newest(checkpoints: list[Path]) -> str | None:
    return str(max(checkpoints, key=lambda path: int(path.name.split("-")[1]))) if checkpoints else None


def _is_complete(checkpoint: Path) -> bool:
    # The trainer writes the weights, the optimizer and the RNG state first and trainer_state.json last.
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def train(
    params: TrainParams,
    student: StudentParams,
    system_prompt: str,
    train_records: list[dict],
    val_records: list[dict],
    adapter_dir: Path,
    checkpoints: Path,
    log_dir: Path,
) -> tuple[dict, object]:
    """Fine-tune, save the adapter (with tokenizer and chat template) to ``adapter_dir``; return the metrics and
    the trained (PEFT) model."""
    from accelerate.utils import extract_model_from_parallel
    from datasets import Dataset
    from dvclive import Live
    from peft import LoraConfig, get_peft_model_state_dict
    from trl import SFTConfig

    cuda = check_hardware(params)
    fsdp = uses_fsdp()
    if not train_records:
        raise PipelineError("the train split is empty; label more sentences or lower split.test_size/val_size")
    bf16 = params.precision == "bf16" or (params.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32

    tokenizer = load_tokenizer(student)
    train_examples, train_too_long = build_examples(tokenizer, train_records, system_prompt, params.max_seq_length)
    val_examples, _ = build_examples(tokenizer, val_records, system_prompt, params.max_seq_length)
    if not train_examples:
        raise PipelineError(f"every training example is longer than train.max_seq_length ({params.max_seq_length})")

    # Each DDP process holds the whole student on its own GPU; under FSDP, accelerate shards and places it.
    device = None if fsdp else f"cuda:{local_rank()}" if cuda else "cpu"
    if cuda:  # bitsandbytes quantizes onto the current GPU, and FSDP requires it to be this process's own
        torch.cuda.set_device(local_rank())
    model = load_model(student, dtype, device, params.quantization)
    if params.quantization == "nf4" and not fsdp:  # its fp32 upcasts would break FSDP's uniform-dtype shards
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    lora = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    config = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        activation_checkpointing=params.gradient_checkpointing,
        # FSDP+QLoRA needs reentrant recomputation (the published recipe); elsewhere, the library default.
        activation_checkpointing_kwargs={"use_reentrant": True} if fsdp else None,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # a float in [0, 1) is a fraction of the total steps
        max_grad_norm=params.max_grad_norm,
        optim=params.optim,
        bf16=bf16,
        tf32=True if cuda and torch.cuda.get_device_capability()[0] >= 8 else None,
        use_cpu=not cuda,
        max_length=params.max_seq_length,
        packing=params.packing,
        # Batches of similar lengths waste less compute on padding; the order is still shuffled by the seed.
        train_sampling_strategy="group_by_length" if params.group_by_length else "random",
        seed=params.seed,
        data_seed=params.seed,
        logging_steps=params.logging_steps,
        save_steps=params.save_steps,
        save_total_limit=1,
        eval_strategy="epoch" if val_examples else "no",
        include_num_input_tokens_seen="non_padding",  # summed over all processes
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search would cost a graph walk
        report_to="none",
        disable_tqdm=False,
    )
    if cuda and not is_launched() and config.n_gpu > 1:
        # One process trains on one GPU: with several visible, the trainer would wrap the model in DataParallel,
        # which trl refuses. Several GPUs are what train.num_processes is for.
        config._n_gpu = 1
    main = config.process_index == 0  # the one process that writes outputs; the others only train
    expected = fingerprint(asdict(params), asdict(student), system_prompt, train_examples)
    with config.main_process_first(local=False):  # the main process tidies the checkpoints before anyone reads
        resume = last_checkpoint(checkpoints, expected, tidy=main)
    clock = StepClock()
    callbacks = [clock]
    if main:  # a resumed run appends to the loss log it started; a new one starts it afresh
        live = Live(dir=str(log_dir), resume=resume is not None, dvcyaml=None, save_dvc_exp=False, report=None)
        callbacks.append(GlobalStepDVCLive(live=live))
    try:
        trainer = Trainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(train_examples),
            eval_dataset=Dataset.from_list(val_examples) if val_examples else None,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=callbacks,
        )
    except ValueError as error:
        if "target module" not in str(error).lower():
            raise
        raise PipelineError(f"train.lora.target_modules: {error}") from None  # modules that the model does not have
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossInProgressBar)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # before FSDP flattens them

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - started

    # Under FSDP this gathers the shards into whole tensors on the main process; every process takes part.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    # Recursive: peft finds the adapter's keys by module name, and names inside nested FSDP units would not match.
    trained = extract_model_from_parallel(trainer.model, recursive=True)
    if main:
        if not get_peft_model_state_dict(trained, state_dict=state_dict):
            raise PipelineError("train: the trained adapter came out empty; please report this with your params.yaml")
        with atomic_dir(adapter_dir) as staging:
            trained.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
            _sort_target_modules(staging / "adapter_config.json")
    trainer.accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(checkpoints)

    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "train_loss": result.training_loss,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "examples": len(train_examples),
        "examples_too_long": train_too_long,
        "tokens_seen": tokens,
        "tokens_per_second": tokens / seconds if seconds else None,
        "tokens_per_second_after_warmup": clock.rate_after_warmup(),
        "steps_per_second": trainer.state.global_step / seconds if seconds else None,
        "runtime_seconds": seconds,
        "resumed_from": resume,
        "trainable_parameters": trainable,
        "num_processes": config.world_size,
        "global_batch_size": params.batch_size * params.grad_accum * config.world_size,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "bf16" if bf16 else "fp32",
        "quantization": params.quantization,
    }
    if cuda:  # the main process's GPU; the others hold the same under DDP
        metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics, trained


def _sort_target_modules(config_path: Path) -> None:
    # peft keeps target_modules in a set, whose order changes from one process to the next; sorted, two identical
    # runs write identical bytes (and DVC sees no change).
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class StepClock(TrainerCallback):
    """Times the optimiser steps, for a throughput without the first steps' warm-up (kernel selection, NCCL setup)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.monotonic(), state.num_input_tokens_seen))

    def rate_after_warmup(self) -> float | None:
        """Tokens per second over all but the first tenth of the steps (at least one) of this run."""
        skip = max(1, len(self.marks) // 10)
        if len(self.marks) - skip < 2:
            return None
        (started, tokens_before), (ended, tokens_after) = self.marks[skip - 1], self.marks[-1]
        return (tokens_after - tokens_before) / (ended - started)


class LossInProgressBar(ProgressCallback):
    """The trainer's progress bar, with the latest losses in its postfix rather than a dict printed at each log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {"loss": logs.get("loss"), "val_loss": logs.get("eval_loss")}
            self.training_bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None}, refresh=False)


class GlobalStepDVCLive(DVCLiveCallback):
    """DVCLive counts its own steps (one per log call); pin them to the trainer's global step so that the loss
    and eval-loss curves share an x axis."""

    def on_log(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.step = state.global_step
        return super().on_log(args, state, control, **kwargs)


class Trainer(SFTTrainer):
    """trl's SFTTrainer, with batches grouped by length in the same order on every process."""

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(ids) for ids in dataset["input_ids"]]
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return EpochSeededLengthGroupedSampler(batch, lengths=lengths, seed=self.args.seed)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from (seed, epoch). transformers draws it from each process's global RNG, and
    those drift apart once training starts: with several processes, the shards of an epoch would overlap, repeating
    some examples and skipping others. Seeded by epoch, a resumed run also sees the order it would have seen."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)
