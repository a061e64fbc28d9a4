"""The train stage's logic: LoRA or QLoRA supervised fine-tuning of the student with trl's SFTTrainer.

`train()` reads top to bottom through its phases: the environment (device, precision), the examples, the model,
the trainer's config, the trainer, the run, saving the adapter, and the metrics; each phase is a function here."""

import contextlib
import itertools
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from redistill.attention import packed_attention_available, use_packed_attention
from redistill.callbacks import ExamplesSeenDVCLive, LossInProgressBar, StepClock
from redistill.checkpoints import checkpoint_step, fingerprint, last_checkpoint
from redistill.compiling import compile_decoder_layers
from redistill.cuda_graphs import WARMUP_STEPS, GraphedLayers, Recorded, cuda_graph_layers
from redistill.errors import PipelineError
from redistill.fused_lora import fused_lora
from redistill.io import atomic_dir, atomic_path
from redistill.launch import is_launched, local_rank, uses_fsdp
from redistill.liger import liger_problem, use_liger_kernels
from redistill.models import load_base, student_tokenizer, write_trained_with
from redistill.prompts import training_example
from redistill.row_padding import ROW_PADDING, PaddedRows
from redistill.student import StudentParams
from redistill.train_params import TrainParams


@dataclass(frozen=True)
class Speedups:
    """train()'s speed-ups, each switchable so that a benchmark can measure what it buys. Each changes no number
    beyond rounding, except where its comment says."""

    packed_attention: bool = True  # packed rows through the varlen kernel on a GPU (off: SDPA with a block mask)
    skip_input_casts: bool = True  # under bf16, no cast of each projection's input to the fp32 adapter and back
    # No step waits for the GPU to read a value on the host (batches copied without waiting, no NaN check of the
    # loss, tokens counted on the host): the host issues the next step while the GPU still runs this one.
    no_host_waits: bool = True
    # A logged step's loss and gradient norm are copied off the GPU without waiting and logged at the next step, once
    # that step's work is queued: reading them at once leaves the GPU idle while the host prepares the next step
    # (+7% tokens/s on the `fast` preset; the same logs either way, tested).
    log_a_step_late: bool = True
    # train.cuda_graphs: every row shape of the run recorded before its first step (RecordRowShapesAhead), not
    # when the run first meets it; the same steps, with the CUDA generator's state put back (+8% tokens/s after
    # warm-up on `fast`, the same loss to every digit: BENCHMARKS.md).
    record_rows_ahead: bool = True
    # Gradient clipping through fused AdamW's gradient divisor instead of a pass that scales every gradient
    # (StudentTrainer._clip_grad_norm); the same update up to rounding.
    clip_in_optimizer: bool = True
    # No checkpoint after the last step (SkipCheckpointAtEnd): save_adapter writes the adapter right after it and
    # drops the checkpoints, so it is never read; under `fast` an 8B's is 8 GB, ~10 s.
    no_checkpoint_at_end: bool = True
    # train.fused_lora: the backward through LoRA's dropout (a product, dropout's backward, an addition: memory-bound
    # passes over the input's gradient) as one Triton kernel; the same gradients, rounded once (+2% on `fast`).
    dropout_kernel: bool = True
    # train.cuda_graphs with train.fused_lora: each forward graph casts all the adapter weights to bf16 in a few
    # kernels (torch._foreach_copy_) at its start, instead of two small casts per projection; the same numbers.
    casts_once: bool = True
    # train.fused_lora: the projections that read one input (q, k and v; gate and up) add their input gradients into
    # one tensor inside their matrix products (cuBLAS's beta) instead of autograd's additions after them
    # (fused_lora.SharedGradient); the same gradients up to rounding.
    shared_input_gradients: bool = True
    # peft makes the adapters on the student's device: on a GPU, initialising `fast`'s 671 M adapter weights (rank 256
    # on an 8B) takes milliseconds instead of ~4 s on the host (nn.Linear's own initialisation, then peft's). Drawn
    # from the GPU's generator, seeded as the host's: other initial weights than the host's draws, from the same
    # distribution (on a CPU the same run).
    adapters_made_on_device: bool = True


def check_hardware(params: TrainParams) -> bool:
    """Whether training runs on CUDA; a setting that the hardware can't run is a PipelineError."""
    cuda = torch.cuda.is_available()
    if params.quantization == "nf4" and not cuda:
        raise PipelineError("train.quantization: nf4 needs a CUDA GPU (bitsandbytes 4-bit); set it to none on CPU")
    if "8bit" in params.optim and not cuda:
        raise PipelineError(f"train.optim: {params.optim} needs a CUDA GPU (bitsandbytes); use adamw_torch on CPU")
    if params.liger_kernels and (problem := liger_problem("train.liger_kernels")):
        raise PipelineError(problem)
    if params.distributed == "fsdp" and not cuda:
        raise PipelineError("train.distributed: fsdp needs CUDA GPUs; use ddp on CPU")
    return cuda


@dataclass(frozen=True)
class Environment:
    """Where and how this process trains."""

    cuda: bool
    fsdp: bool  # launched by accelerate with FSDP: the student is sharded over the processes
    bf16: bool
    device: str | None  # None under FSDP: accelerate shards and places the student

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def environment(params: TrainParams) -> Environment:
    cuda = check_hardware(params)
    fsdp = uses_fsdp()
    bf16 = params.precision == "bf16" or (params.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    # Each DDP process holds the whole student on its own GPU.
    device = None if fsdp else f"cuda:{local_rank()}" if cuda else "cpu"
    return Environment(cuda, fsdp, bf16, device)


@dataclass(frozen=True)
class Examples:
    train: list[dict]
    val: list[dict]
    too_long: int  # training examples dropped for exceeding train.max_seq_length


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


def training_examples(
    tokenizer, train_records: list[dict], val_records: list[dict], system_prompt: str, max_seq_length: int
) -> Examples:
    if not train_records:
        raise PipelineError("the train split is empty; label more sentences or lower split.test_size/val_size")
    train_examples, too_long = build_examples(tokenizer, train_records, system_prompt, max_seq_length)
    val_examples, _ = build_examples(tokenizer, val_records, system_prompt, max_seq_length)
    if not train_examples:
        raise PipelineError(f"every training example is longer than train.max_seq_length ({max_seq_length})")
    return Examples(train_examples, val_examples, too_long)


def load_for_training(params: TrainParams, student: StudentParams, env: Environment, speedups: Speedups):
    """The student as training needs it: quantized if asked, its attention fit for packed rows."""
    if env.cuda:  # bitsandbytes quantizes onto the current GPU, and FSDP requires it to be this process's own
        torch.cuda.set_device(local_rank())
    # Trained weights stay fp32 (bf16 ones would lose most small updates); under bf16 autocast they compute in bf16.
    weights = torch.float32 if params.method == "full" else env.dtype
    model = load_base(student.model, weights, env.device, params.quantization, student.attn_implementation)
    # The varlen kernel takes half-precision inputs only: fp32 weights feed it fp32 rotary products.
    varlen = speedups.packed_attention and params.method == "lora" and packed_attention_available(env.dtype)
    if params.packing and varlen:
        use_packed_attention(model)
    if params.quantization == "nf4" and params.gradient_checkpointing:
        # Recomputed layers need an input that asks for gradients. Unlike peft's prepare_model_for_kbit_training,
        # the frozen embeddings and head stay in bf16: fp32 copies cost 2 GiB on an 8B student and change nothing
        # under bf16 autocast, where the head's matrix product runs in bf16 anyway.
        model.enable_input_require_grads()
    return model


def trainer_config(params: TrainParams, env: Environment, checkpoints: Path, validates: bool, speedups: Speedups):
    """The trainer's arguments from the train block (trl's SFTConfig)."""
    from trl import SFTConfig

    config = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        activation_checkpointing=params.gradient_checkpointing,
        # FSDP+QLoRA needs reentrant recomputation (the published recipe); elsewhere, the library default.
        activation_checkpointing_kwargs={"use_reentrant": True} if env.fsdp else None,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # transformers 5 has no warmup_ratio: a float < 1 here is a fraction
        max_grad_norm=params.max_grad_norm,
        neftune_noise_alpha=params.neftune_alpha or None,  # 0: none, as null is for the trainer
        optim=params.optim,
        bf16=env.bf16,
        tf32=True if env.cuda and torch.cuda.get_device_capability()[0] >= 8 else None,
        use_cpu=not env.cuda,
        # build_examples has already dropped the examples over max_seq_length; trl refuses to cut packed rows.
        max_length=None if params.packing else params.max_seq_length,
        # Packing: each micro-batch's examples are concatenated into one row with no padding; position ids restart
        # at every example, and the attention mask built from them keeps each example to itself.
        padding_free=params.packing,
        # Batches of similar lengths waste less compute on padding; the order is still shuffled by the seed.
        train_sampling_strategy="group_by_length" if params.group_by_length else "random",
        seed=params.seed,
        data_seed=params.seed,
        logging_steps=params.logging_steps,
        save_steps=params.save_steps,
        save_total_limit=1,
        eval_strategy="epoch" if validates else "no",
        # Summed over all processes. A packed row has no padding to leave out (and "non_padding" would count an
        # example's closing EOS as padding where pad = eos).
        include_num_input_tokens_seen="all" if params.packing else "non_padding",
        # Speedups.no_host_waits: the batch goes to the GPU from pinned memory without waiting for the GPU, and a NaN
        # or infinite loss is logged as it is rather than replaced by the running mean (checking it waits too).
        accelerator_config={"non_blocking": speedups.no_host_waits},
        logging_nan_inf_filter=not speedups.no_host_waits,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search would cost a graph walk
        report_to="none",
        disable_tqdm=False,
    )
    if env.cuda and not is_launched() and config.n_gpu > 1:
        # One process trains on one GPU: with several visible, the trainer would wrap the model in DataParallel,
        # which trl refuses. Several GPUs are what train.num_processes is for. (Trainer sets this field itself
        # for a model split over GPUs; there is no public switch.)
        config._n_gpu = 1
    return config


def loss_log_callbacks(config, log_dir: Path | None, resumed_at: int | None, examples: int) -> list:
    """DVCLive's loss curve, on the one process that writes outputs; a run resumed from the checkpoint of step
    ``resumed_at`` appends to the log it started, cut back to that step (`drop_torn_summary`, `trim_curves`)."""
    if config.process_index != 0 or log_dir is None:
        return []
    from dvclive import Live

    resumed = resumed_at is not None
    if resumed:
        drop_torn_summary(log_dir)
    live = Live(dir=str(log_dir), resume=resumed, dvcyaml=None, save_dvc_exp=False, report=None)
    callback = ExamplesSeenDVCLive(examples, global_batch_size(config), live=live)
    if resumed:
        trim_curves(log_dir, callback.examples_seen(resumed_at))
    return [callback]


def drop_torn_summary(log_dir: Path) -> None:
    """DVCLive rewrites its summary (metrics.json) in place at every log, so a run killed mid-write leaves it cut
    short, and resuming would stop reading it. It holds only the last logged values, which the resumed run's next log
    writes again: a cut one is removed."""
    summary = log_dir / "metrics.json"
    try:
        json.loads(summary.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except ValueError:
        summary.unlink()


def trim_curves(log_dir: Path, last_step: int) -> None:
    """The curves' rows (DVCLive's TSV files, steps in examples seen) up to ``last_step``, where the resumed run's
    checkpoint was saved: the killed run logged past it, and the resumed run logs those steps again. A row the kill
    cut short goes too."""
    for curve in (log_dir / "plots").rglob("*.tsv"):
        header, *rows = curve.read_text(encoding="utf-8").splitlines()
        columns = header.count("\t") + 1
        kept = [row for row in rows if row.count("\t") + 1 == columns and _step_of(row) <= last_step]
        if len(kept) < len(rows):
            with atomic_path(curve) as staging:
                staging.write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")


def _step_of(row: str) -> float:
    """A curve row's step; a row cut before its step ends sorts after every step."""
    try:
        return int(row.split("\t", 1)[0])
    except ValueError:
        return math.inf


def global_batch_size(config) -> int:
    """Examples per optimiser step, over all processes."""
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size


def lora_config(params: TrainParams):
    """peft's config of the adapter to train; None where every weight trains (train.method: full)."""
    from peft import LoraConfig

    if params.method == "full":
        return None
    return LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def build_trainer(
    model, config, examples: Examples, tokenizer, params: TrainParams, callbacks: list, adapters_on_device: bool = False
):
    """trl's trainer on ``model`` (with the LoRA adapter unless train.method is full; made on the model's device with
    ``adapters_on_device``), the loss in the progress bar, and compiled layers if asked."""
    from datasets import Dataset

    try:
        with torch.device(model.device) if adapters_on_device else contextlib.nullcontext():
            trainer = StudentTrainer(
                model=model,
                args=config,
                train_dataset=Dataset.from_list(examples.train),
                eval_dataset=Dataset.from_list(examples.val) if examples.val else None,
                processing_class=tokenizer,
                peft_config=lora_config(params),
                callbacks=callbacks,
            )
    except ValueError as error:
        if "target module" not in str(error).lower():
            raise
        raise PipelineError(f"train.lora.target_modules: {error}") from None  # modules that the model does not have
    trainer.objective = Objective.of(params)
    trainer.remove_callback(ProgressCallback)  # for LossInProgressBar
    trainer.add_callback(LossInProgressBar)
    if params.liger_kernels:  # before any compiling
        use_liger_kernels(trainer.model)
    if params.row_length_multiple:
        trainer.data_collator = PaddedRows(trainer.data_collator, params.row_length_multiple, tokenizer.pad_token_id)
    trainer.data_collator = WithAnswerPositions(trainer.data_collator)
    if params.compile:
        if not params.gradient_checkpointing:  # (with checkpointing this is done already)
            # The first layer's input then asks for gradients as the others' do, so all layers share one compiled
            # graph instead of two; the cost is the first layer's input gradient, ~1% of a step.
            trainer.model.enable_input_require_grads()
        compile_decoder_layers(trainer.model)
    return trainer


def run(trainer, resume: str | None, params: TrainParams, env: Environment, speedups: Speedups):
    """The training loop; running out of GPU memory is one line saying what to change."""
    from peft.helpers import disable_input_dtype_casting

    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        # Under bf16 autocast the adapter's products run in bf16 whatever their input's dtype, so peft's cast of each
        # projection's input to the fp32 adapter weights (and autocast's cast back) copies activations twice per
        # projection, forward and backward, and changes no number (tested): 5-15% faster steps (BENCHMARKS.md).
        with (
            disable_input_dtype_casting(trainer.model, active=env.bf16 and speedups.skip_input_casts),
            # Compiled layers (train.compile) keep fused LoRA as it was last run with them (sixth session): dynamo
            # has not traced the kernel, and would guard on the casts' table, which a recording fills (compiling
            # again inside the recording).
            fused_lora(
                trainer.model,
                active=params.fused_lora,
                dropout_kernel=speedups.dropout_kernel and not params.compile,
                shared_input_gradients=speedups.shared_input_gradients and not params.compile,
            ),
            cuda_graph_layers(
                trainer.model,
                active=params.cuda_graphs,
                compiled=params.compile,
                casts_once=params.fused_lora and speedups.casts_once and not params.compile,
            ) as graphed,
        ):
            if graphed is not None and env.cuda and speedups.record_rows_ahead:
                trainer.add_callback(RecordRowShapesAhead(trainer, graphed))
            return trainer.train(resume_from_checkpoint=resume)
    except torch.OutOfMemoryError:
        raise PipelineError(
            f"train: out of GPU memory with train.preset {params.preset}; try train.preset: low_memory, or a smaller "
            "train.batch_size with a larger train.grad_accum"
        ) from None


def save_adapter(trainer, tokenizer, adapter_dir: Path, checkpoints: Path, student: StudentParams, system_prompt: str):
    """Write the adapter (or, trained in full, the whole model), its tokenizer (with the chat template) and what it
    was trained with to ``adapter_dir``, then drop the checkpoints; every process takes part, the main one writes.
    Returns the trained model."""
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel, get_peft_model_state_dict

    # Under FSDP this gathers the shards into whole tensors on the main process.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    # Recursive: peft finds the adapter's keys by module name, and names inside nested FSDP units would not match.
    trained = extract_model_from_parallel(trainer.model, recursive=True)
    main = trainer.args.process_index == 0
    adapter = isinstance(trained, PeftModel)
    if main:
        if adapter and not get_peft_model_state_dict(trained, state_dict=state_dict):
            raise PipelineError("train: the trained adapter came out empty; please report this with your params.yaml")
        with atomic_dir(adapter_dir) as staging:
            trained.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
            if adapter:
                _sort_target_modules(staging / "adapter_config.json")
            write_trained_with(staging, student.model, system_prompt)
    trainer.accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(checkpoints)
    return trained


def train(
    params: TrainParams,
    student: StudentParams,
    system_prompt: str,
    train_records: list[dict],
    val_records: list[dict],
    adapter_dir: Path,
    checkpoints: Path,
    log_dir: Path | None,
    callbacks: tuple = (),
    speedups: Speedups = Speedups(),
) -> tuple[dict, object]:
    """Fine-tune, save the adapter (with tokenizer, chat template and system prompt) to ``adapter_dir``; return the
    metrics and the trained (PEFT) model. DVCLive writes the loss curve to ``log_dir`` (None: no curve);
    ``callbacks`` are further trainer callbacks (a profiler, say); ``speedups`` are for benchmarks to turn off."""
    entered = time.monotonic()
    env = environment(params)
    tokenizer = student_tokenizer(student)
    examples = training_examples(tokenizer, train_records, val_records, system_prompt, params.max_seq_length)
    model = load_for_training(params, student, env, speedups)
    config = trainer_config(params, env, checkpoints, validates=bool(examples.val), speedups=speedups)
    run_id = fingerprint(asdict(params), asdict(student), system_prompt, examples.train)
    with config.main_process_first(local=False):  # the main process tidies the checkpoints before anyone reads
        resume = last_checkpoint(checkpoints, run_id, tidy=config.process_index == 0)
    clock = StepClock()
    resumed_at = None if resume is None else checkpoint_step(resume)
    loss_log = loss_log_callbacks(config, log_dir, resumed_at, len(examples.train))
    at_end = [SkipCheckpointAtEnd()] if speedups.no_checkpoint_at_end else []
    all_callbacks = [clock, *callbacks, *loss_log, *at_end]
    trainer = build_trainer(model, config, examples, tokenizer, params, all_callbacks, speedups.adapters_made_on_device)
    trainer.tokens_counted_on_host = speedups.no_host_waits
    trainer.logs_a_step_late = speedups.log_a_step_late and config.world_size == 1 and not env.fsdp  # plain tensors
    trainer.clips_in_optimizer = speedups.clip_in_optimizer
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # before FSDP flattens them

    started = time.monotonic()
    result = run(trainer, resume, params, env, speedups)
    trained_at = time.monotonic()
    trained = save_adapter(trainer, tokenizer, adapter_dir, checkpoints, student, system_prompt)

    timings = {"runtime": trained_at - started, "setup": started - entered, "saving": time.monotonic() - trained_at}
    facts = {
        "resumed_from": resume,
        "trainable_parameters": trainable,
        "tokens_per_second_after_warmup": clock.rate_after_warmup(),
        "attention": trained.config._attn_implementation,
    }
    return train_metrics(trainer, result, examples, env, params, timings, facts), trained


# Train params that metrics/train.json repeats, so that `dvc metrics diff` shows what ran beside what it measured.
RECORDED_PARAMS = (
    "preset", "method", "batch_size", "grad_accum", "packing", "compile", "cuda_graphs", "row_length_multiple",
    "fused_lora", "liger_kernels", "gradient_checkpointing", "optim",
)  # fmt: skip


def train_metrics(
    trainer, result, examples: Examples, env: Environment, params: TrainParams, timings: dict, facts: dict
) -> dict:
    """metrics/train.json: losses, throughput, the run's fixed costs (``timings``: runtime, setup, saving, in
    seconds), and what ran."""
    state, config, seconds = trainer.state, trainer.args, timings["runtime"]
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    metrics = {
        "train_loss": result.training_loss,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "steps": state.global_step,
        "epochs": state.epoch,
        "examples": len(examples.train),
        "examples_too_long": examples.too_long,
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": state.num_input_tokens_seen / seconds if seconds else None,
        "tokens_per_second_after_warmup": facts["tokens_per_second_after_warmup"],
        "steps_per_second": state.global_step / seconds if seconds else None,
        "runtime_seconds": seconds,
        # Loading the student, tokenising, building the trainer; then saving the adapter: a short run's fixed costs.
        "setup_seconds": timings["setup"],
        "saving_seconds": timings["saving"],
        "resumed_from": facts["resumed_from"],
        "trainable_parameters": facts["trainable_parameters"],
        "num_processes": config.world_size,
        "global_batch_size": global_batch_size(config),
        **{name: getattr(params, name) for name in RECORDED_PARAMS},
        "attention": facts["attention"],
        "device": torch.cuda.get_device_name() if env.cuda else "cpu",
        "precision": "bf16" if env.bf16 else "fp32",
        "quantization": params.quantization,
    }
    if env.cuda:  # the main process's GPU; the others hold the same under DDP
        metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


def _sort_target_modules(config_path: Path) -> None:
    # peft keeps target_modules in a set, whose order changes from one process to the next; sorted, two identical
    # runs write identical bytes (and DVC sees no change).
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Objective:
    """What the loss of an answer token is: cross-entropy, with part of the target spread over the vocabulary
    (label smoothing), and weighted by the token's own detached probability (DFT) if asked."""

    label_smoothing: float = 0.0
    dft: bool = False

    @classmethod
    def of(cls, params: TrainParams) -> "Objective":
        return cls(label_smoothing=params.label_smoothing, dft=params.loss == "dft")


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor, objective: Objective) -> torch.Tensor:
    """The summed loss of the labelled targets (-100: none) under ``objective``."""
    cross_entropy = partial(torch.nn.functional.cross_entropy, logits, targets, ignore_index=-100, reduction="none")
    losses = cross_entropy(label_smoothing=objective.label_smoothing)
    if objective.dft:  # the weight is the token's probability: from the plain loss, whatever the smoothing
        nll = cross_entropy() if objective.label_smoothing else losses
        losses = losses * torch.exp(-nll).detach()
    return losses.sum()


ANSWER_POSITIONS = "answer_positions"  # a batch's key: the positions whose logits the loss needs (compute_loss)


@dataclass(frozen=True)
class LateLog:
    """A logging step's loss (summed since the last log) and gradient norm on their way to the host, and what the
    trainer's state was at that step."""

    values: torch.Tensor  # on the host: loss sum, gradient norm (NaN: none)
    copied: torch.cuda.Event | None  # None: the copy was synchronous (a CPU run)
    global_step: int
    epoch: float | None
    num_input_tokens_seen: int
    steps: int  # optimiser steps the loss sum covers
    learning_rate: float
    start_time: float


class StudentTrainer(SFTTrainer):
    """trl's SFTTrainer, with batches grouped by length in the same order on every process, the loss computed
    from the logits of the labelled positions only, under the train block's objective, and (one process) each
    logged step's values read at the next step."""

    objective = Objective()
    tokens_counted_on_host = True  # Speedups.no_host_waits
    clips_in_optimizer = False  # Speedups.clip_in_optimizer
    logs_a_step_late = False  # Speedups.log_a_step_late, where one process trains
    late_log: LateLog | None = None

    def _maybe_log_save_evaluate(
        self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=None
    ):
        if not self.logs_a_step_late:
            return super()._maybe_log_save_evaluate(
                tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate
            )
        this_step = None
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            this_step = self._copy_log_values(tr_loss, grad_norm, learning_rate, start_time)
            tr_loss -= tr_loss
            self._globalstep_last_logged = self.state.global_step
            self.store_flos()
        self.log_late_log()  # the last logged step's, whose copy is done or nearly: this step's work is queued
        self.late_log = this_step
        self.control.should_log = False  # logged: the trainer's own logging below has nothing left to do
        if self.control.should_evaluate or self.control.should_save:  # they wait for the GPU anyway
            self.log_late_log()
        super()._maybe_log_save_evaluate(
            tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate
        )

    def _copy_log_values(self, tr_loss, grad_norm, learning_rate, start_time) -> LateLog:
        norm = grad_norm if grad_norm is not None else math.nan
        values = torch.stack([tr_loss.detach().float(), torch.as_tensor(norm, device=tr_loss.device).float()])
        cuda = values.is_cuda
        host = torch.empty(2, pin_memory=cuda)
        host.copy_(values, non_blocking=cuda)
        copied = None
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
        state = self.state
        return LateLog(
            values=host,
            copied=copied,
            global_step=state.global_step,
            epoch=state.epoch,
            num_input_tokens_seen=state.num_input_tokens_seen,
            steps=state.global_step - self._globalstep_last_logged,
            learning_rate=learning_rate if learning_rate is not None else self._get_learning_rate(),
            start_time=start_time,
        )

    def log_late_log(self) -> None:
        """Log the values copied at the last logging step, as the trainer would have logged them then: the log
        entry, the callbacks (the loss curve's x axis) and the running loss see that step's state."""
        late, self.late_log = self.late_log, None
        if late is None:
            return
        if late.copied is not None:
            late.copied.synchronize()
        loss_sum, norm = late.values.tolist()
        self._total_loss_scalar += loss_sum
        logs = {"loss": loss_sum / late.steps}
        if not math.isnan(norm):
            logs["grad_norm"] = norm
        logs["learning_rate"] = late.learning_rate
        state, now = self.state, (self.state.global_step, self.state.epoch, self.state.num_input_tokens_seen)
        state.global_step, state.epoch = late.global_step, late.epoch
        state.num_input_tokens_seen = late.num_input_tokens_seen
        try:
            self.log(logs, late.start_time)
        finally:
            state.global_step, state.epoch, state.num_input_tokens_seen = now

    def _clip_grad_norm(self, model):
        """The gradients' norm, clipped to max_grad_norm: by fused (Adam)AdamW as it reads them (one process, no
        loss scaler), else by the trainer. clip_grad_norm_ multiplies every gradient by max_norm / (norm + 1e-6)
        where that is below 1, a pass over the adapters' 2.7 GB of fp32 gradients on the 8B (~2 ms a step on an
        H100); fused Adam divides them by its ``grad_scale`` in its own pass."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # within accelerate's wrapper
        fused_adam = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and optimizer.defaults.get("fused")
        one_process = self.accelerator.num_processes == 1 and self.accelerator.scaler is None
        if not (self.clips_in_optimizer and fused_adam and one_process):
            return super()._clip_grad_norm(model)
        gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
        norm = torch.nn.utils.get_total_norm(gradients)
        optimizer.grad_scale = ((norm + 1e-6) / self.args.max_grad_norm).clamp(min=1.0)
        return norm

    def _finalize_training(self, trial, num_train_samples, start_time):
        self.log_late_log()  # the last step's log, before the trainer adds up the loss
        return super()._finalize_training(trial, num_train_samples, start_time)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(ids) for ids in dataset["input_ids"]]
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return EpochSeededLengthGroupedSampler(batch, lengths=lengths, seed=self.args.seed)

    def _track_num_input_tokens(self, inputs):
        # A padded row's dummy example is no input (train.row_length_multiple): the tokens seen are those before it.
        padding = inputs.get(ROW_PADDING, 0)
        one_process = self.accelerator.num_processes == 1
        if self.tokens_counted_on_host and self.args.include_num_input_tokens_seen == "all" and one_process:
            # The trainer's own count goes through the GPU and back: two waits for the GPU a step.
            self.state.num_input_tokens_seen += inputs["input_ids"].numel() - padding
            return
        if padding:
            inputs = {**inputs, "input_ids": inputs["input_ids"][:, :-padding]}
        super()._track_num_input_tokens(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean loss (cross-entropy unless the objective says otherwise) over the labelled tokens (of the whole
        accumulated batch, on every process, when the trainer counts them), as transformers computes it; but the
        vocabulary-wide logits are built only where a row has a label (the answer), not over the prompt, and no
        per-step metric is computed from them (trl's entropy and token accuracy cost passes over those logits and a
        device sync every micro-batch)."""
        inputs = dict(inputs)
        inputs.pop(ROW_PADDING, None)
        targets = inputs.pop("labels")[:, 1:]  # position i predicts token i + 1
        positions = inputs.pop(ANSWER_POSITIONS)
        outputs = model(**inputs, use_cache=False, logits_to_keep=positions)
        kept = targets[:, positions]
        loss = summed_token_loss(outputs.logits.float().flatten(0, 1), kept.flatten(), self.objective)
        count = num_items_in_batch if num_items_in_batch is not None else (kept != -100).sum()
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients over the processes
        return (loss, outputs) if return_outputs else loss


class SkipCheckpointAtEnd(TrainerCallback):
    """Cancels the checkpoint that the trainer writes after its last step: save_adapter follows at once."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False


class RecordRowShapesAhead(TrainerCallback):
    """Before the run's first step, the graphed layers (train.cuda_graphs) record every row shape the run will meet:
    a training step of each (no optimiser step) that stops once the layers have recorded its shape
    (`GraphedLayers.recording_only`), after an eager one where the layers need it. Met mid-run, a new shape costs its
    recording, and where one is needed an eager step, ~0.4-0.8 s on an 8B, among the steps that the throughput after
    warm-up measures. The rows are the run's own, in its order: the length-grouped sampler is seeded by epoch. The
    gradients are dropped and the CUDA generator's state put back: the run's steps and dropout's draws are those it
    would have had."""

    def __init__(self, trainer: "StudentTrainer", graphed: GraphedLayers) -> None:
        self.trainer, self.graphed = trainer, graphed

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        trainer = self.trainer
        sampler = trainer._get_train_sampler(train_dataloader.dataset)
        if not isinstance(sampler, EpochSeededLengthGroupedSampler) or args.gradient_accumulation_steps != 1:
            return  # a random order, or micro-batches: shapes are recorded as the run meets them
        model = trainer.model_wrapped.train()
        rows = one_batch_of_each_shape(sampler, train_dataloader, args.train_batch_size, state.max_steps)
        with (
            torch.random.fork_rng(devices=[torch.cuda.current_device()]),  # dropout's draws: the run's own
            self.graphed.recording_only(),
        ):
            for batch in rows:
                inputs = trainer._prepare_inputs(batch)
                for _ in range(WARMUP_STEPS + 1):  # eager steps where the layers need them, then the recording
                    try:
                        self.forward_and_backward(model, inputs)
                    except Recorded:  # the step stopped once its shape was recorded
                        break
                    finally:
                        model.zero_grad(set_to_none=True)  # as at a step's start

    def forward_and_backward(self, model, inputs: dict) -> None:
        """A training step's forward and backward. Its loss, and with it the autograd graph, ends here: a later
        recording that met this graph's gradient accumulators (made on the default stream) would make the default
        stream wait on the recording's, which stops the recording (the first try on an H100)."""
        trainer = self.trainer
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)


def one_batch_of_each_shape(sampler, dataloader, batch_size: int, steps: int) -> list[dict]:
    """The first batch of each `row_shape` among the first ``steps`` batches of ``batch_size`` that ``dataloader``
    would give with ``sampler`` over its epochs, collated by its own collator."""

    def batches_of_indices() -> Iterator[list[int]]:
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            order = list(sampler)
            yield from (order[start : start + batch_size] for start in range(0, len(order), batch_size))

    batches: dict[tuple, dict] = {}
    for indices in itertools.islice(batches_of_indices(), steps):
        batch = dataloader.collate_fn([dataloader.dataset[index] for index in indices])
        batches.setdefault(row_shape(batch), batch)
    return list(batches.values())


def row_shape(batch: dict) -> tuple[int, int]:
    """A packed row's shape as the graphed layers record it: its length and its count of example boundaries."""
    return batch["input_ids"].shape[1], batch["cu_seq_lens_q"].numel()


class WithAnswerPositions:
    """Wraps the trainer's collator: each batch also holds the positions whose next token is labelled in some row,
    found on the host (on the GPU, finding them would make the host wait for the GPU every step)."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        batch[ANSWER_POSITIONS] = (batch["labels"][:, 1:] != -100).any(dim=0).nonzero().squeeze(1)
        return batch


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
