"""The train block of params.yaml: its knobs, the named presets that fill the knobs left null, and their checks.

PRESETS is the one home of the presets' values: params.yaml's comments and the docs point to the table that
docs/params.md generates from it."""

from dataclasses import dataclass

from redistill.launch import STRATEGIES
from redistill.liger import liger_runs_here
from redistill.params import Check, at_least, check_param, in_range, one_of, or_null, param, positive, require

SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "cosine_with_min_lr")
PRECISIONS = ("auto", "bf16", "fp32")
METHODS = ("lora", "full")

# What each preset costs and buys is measured in docs/training.md. Every preset puts the post's 8 examples in each
# optimiser step (batch_size * grad_accum), so the learning rate and schedule mean the same under all three: 16 a step
# ran 1.5-1.9x faster on the 8B but scored lower on held-out sentences (BENCHMARKS.md).
PRESETS = {
    # The post's recipe: 4-bit QLoRA, recomputed activations, 4 x 2 padded batches, 8-bit AdamW. Fits a 16 GB card.
    "post": {
        "method": "lora",
        "learning_rate": 2.0e-4,
        "epochs": 2,
        "quantization": "nf4",
        "gradient_checkpointing": True,
        "batch_size": 4,
        "grad_accum": 2,
        "optim": "adamw_8bit",
        "packing": False,
        "save_steps": 50,
        "neftune_alpha": 0.0,
        "cuda_graphs": False,
        "row_length_multiple": 0,
        "fused_lora": False,
        "liger_kernels": False,
    },
    # bf16 LoRA, nothing recomputed, the 8 examples of a step packed into one row, fused AdamW, a checkpoint only
    # every 500 steps (one, adapter + optimiser, is 8 GB for the 8B), fused LoRA, the layers replayed as CUDA graphs
    # over rows padded to multiples of 64 (every row shape recorded before the first step), and Liger's kernels,
    # where each can run (TrainParams.__post_init__).
    # Needs ~35 GiB at rank 256 (its peak on an H100, BENCHMARKS.md).
    "fast": {
        "method": "lora",
        "learning_rate": 2.0e-4,
        "epochs": 2,
        "quantization": "none",
        "gradient_checkpointing": False,
        "batch_size": 8,
        "grad_accum": 1,
        "optim": "adamw_torch_fused",
        "packing": True,
        "save_steps": 500,
        "neftune_alpha": 0.0,
        "cuda_graphs": True,
        "row_length_multiple": 64,
        "fused_lora": True,
        "liger_kernels": True,
    },
    # The post's memory savers with the step's 8 examples packed into one row: the least memory per example.
    "low_memory": {
        "method": "lora",
        "learning_rate": 2.0e-4,
        "epochs": 2,
        "quantization": "nf4",
        "gradient_checkpointing": True,
        "batch_size": 8,
        "grad_accum": 1,
        "optim": "adamw_8bit",
        "packing": True,
        "save_steps": 50,
        "neftune_alpha": 0.0,
        "cuda_graphs": False,
        "row_length_multiple": 0,
        "fused_lora": False,
        "liger_kernels": False,
    },
    # Every weight of a small student (SmolLM2-135M) trained, fp32 master weights, NEFTune noise on the embeddings: on
    # the quality bench (docs/quality.md) 0.207 exact F1 greedy against LoRA's 0.186, and 0.276 with 16 samples at
    # temperature 1.0 kept at 4 votes, structured (its decoding there).
    "small_student": {
        "method": "full",
        "learning_rate": 2.0e-4,
        "epochs": 3,
        "quantization": "none",
        "gradient_checkpointing": False,
        "batch_size": 8,
        "grad_accum": 1,
        "optim": "adamw_torch",
        "packing": False,
        "save_steps": 50,
        "neftune_alpha": 5.0,
        "cuda_graphs": False,
        "row_length_multiple": 0,
        "fused_lora": False,
        "liger_kernels": False,
    },
}


@dataclass(frozen=True)
class LoraParams:
    r: int = param("the adapter's rank (the post's); 16-64 is common and much smaller", positive)
    alpha: int = param("the adapter's scale numerator: its update is scaled by `alpha / r`", positive)
    dropout: float = param("dropout on the adapter's input", in_range(0, 1))
    target_modules: list[str] = param("module names to adapt (the default: all seven of Llama's projections)")


@dataclass(frozen=True)
class TrainParams:
    """The train block. The keys a preset sets may be null: they then take the preset's value (filled in on
    construction, so everything downstream, the checkpoint fingerprint included, sees the values that ran)."""

    preset: str = param(
        "`post` (the post's recipe), `fast` (the highest throughput, ~35 GiB for the 8B), `low_memory` (the "
        "least memory, under 10 GiB), `small_student` (every weight of a small student such as SmolLM2-135M "
        "trained; the best measured quality, [quality.md](quality.md)): fills every train key that is `null` with "
        "the preset's value ([presets](#presets)); a value you set wins. What each costs and buys: "
        "[training.md](training.md)",
        one_of(*PRESETS),
    )
    epochs: float | None = param("passes over the training set (may be fractional)", positive)
    batch_size: int | None = param(
        "sequences per device per forward pass; tokens per optimiser step ~ `batch_size * grad_accum * sentence "
        "length`",
        positive,
    )
    grad_accum: int | None = param(
        "forward passes per optimiser step; every preset takes the post's examples per step (`batch_size * "
        "grad_accum`), so the learning rate means the same under all",
        positive,
    )
    learning_rate: float | None = param("peak learning rate", positive)
    lr_scheduler: str = param("all honour the warmup (the post's `constant` ignored it)", one_of(*SCHEDULERS))
    warmup_ratio: float = param("fraction of the steps spent warming up", in_range(0, 1))
    max_grad_norm: float = param("gradient clipping", positive)
    label_smoothing: float = param(
        "the share of each answer token's target spread evenly over the whole vocabulary (label smoothing); 0: plain "
        "cross-entropy",
        in_range(0, 1),
    )
    neftune_alpha: float | None = param(
        "NEFTune: uniform noise of scale `alpha / sqrt(length * width)` added to the input embeddings while training "
        "(Jain et al., 2023); 0: none",
        or_null(at_least(0)),
    )
    loss: str = param(
        "`nll`: cross-entropy on the answer's tokens; `dft`: each token's loss weighted by its own (detached) "
        "probability (dynamic fine-tuning, Wu et al., 2025)",
        one_of("nll", "dft"),
    )
    optim: str | None = param(
        "any `transformers` optimiser name; the 8-bit ones need a CUDA GPU (bitsandbytes) and don't work with "
        "`train.distributed: fsdp`; use `adamw_torch` on CPU"
    )
    gradient_checkpointing: bool | None = param("recompute activations: less memory, ~30% slower")
    max_seq_length: int = param("longer examples are dropped and counted; shorter than a prompt is an error", positive)
    packing: bool | None = param(
        "a micro-batch's examples in one row, without padding and without attention across examples"
    )
    compile: bool = param(
        "`torch.compile` the decoder layers: ~20% shorter steps on a GPU for 40-60 s of compiling on a machine's "
        "first run; later runs load the compiled code from `~/.cache/redistill/inductor` ([training.md](training.md))"
    )
    cuda_graphs: bool | None = param(
        "the decoder layers' forward and backward recorded as CUDA graphs and replayed, one launch each instead of "
        "thousands a step, on a GPU; needs `train.row_length_multiple`, `train.grad_accum: 1`, one process and no "
        "quantization (a preset's graphs are off where they can't run) ([training.md](training.md))"
    )
    row_length_multiple: int | None = param(
        "with `train.packing`, each packed row is padded up to a multiple of this many tokens (one dummy example, "
        "no loss), so that rows come in a few lengths, as CUDA graphs need; `0`: no padding",
        at_least(0),
    )
    fused_lora: bool | None = param(
        "each LoRA projection as one autograd function: fewer kernels and casts a step than peft's modules, the "
        "same numbers up to rounding ([training.md](training.md))"
    )
    liger_kernels: bool | None = param(
        "Liger's Triton kernels for the RMS norms, the SwiGLU product and the rotary embedding in place of the "
        "model's own, on a GPU: one fused kernel each instead of several; needs `pip install -r "
        "requirements-gpu.txt` (`make setup` installs it where PyTorch sees a GPU; a preset's Liger is off where it "
        "can't run) ([training.md](training.md))"
    )
    group_by_length: bool = param(
        "batch sentences of similar length together (less padding, faster, same data); `false`: plain random batches"
    )
    seed: int = param("seed of initialisation, dropout and data order")
    quantization: str | None = param(
        "`nf4`: 4-bit double-quant QLoRA (CUDA only); `none`: LoRA on bf16/fp32 weights", one_of("nf4", "none")
    )
    precision: str = param(
        "`auto`: bf16 (and tf32) on GPUs that have it, else fp32; `bf16`; `fp32`", one_of(*PRECISIONS)
    )
    max_steps: int = param(
        "`-1` trains whole epochs; a positive count stops there (benchmarks)",
        Check("-1 (whole epochs) or positive", lambda steps: steps == -1 or steps > 0),
    )
    logging_steps: int = param("loss log interval", positive)
    save_steps: int | None = param("checkpoint interval: an interrupted run resumes from the last one", positive)
    num_processes: int = param(
        "processes, one per GPU; more than 1 launches the stage through `accelerate launch` (see [gpus.md](gpus.md)); "
        "the global batch is `batch_size * grad_accum * num_processes`",
        positive,
    )
    distributed: str = param(
        "`ddp`: a whole student on each GPU; `fsdp`: the student sharded over the GPUs (FSDP+QLoRA, for students "
        "that don't fit one)",
        one_of(*STRATEGIES),
    )
    accelerate_config: str | None = param(
        "an `accelerate config` YAML to launch with instead of the two keys above (CPU offload, other FSDP "
        "settings); it launches even with 1 process"
    )
    method: str | None = param(
        "`lora`: train a LoRA adapter (`train.lora`) on the frozen student; `full`: train every weight, for small "
        "students (fp32 master weights, bf16 autocast on a GPU; the stage then saves a whole model folder in "
        "`models/adapter/`, which evaluate, extract and merge load as they load an adapter)",
        one_of(*METHODS),
    )
    lora: LoraParams

    def __post_init__(self) -> None:
        check_param(self, "preset", "train.preset")  # before its values are looked up, for a bad preset's own error
        filled = set()
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
                filled.add(name)
        if "cuda_graphs" in filled and self.cuda_graphs and not (self.replayable and self.packing):
            # A preset's graphs give way to what they can't run with (several processes, say): a speed-up, not a
            # requirement. Set train.cuda_graphs: true yourself to be told which setting stops them.
            object.__setattr__(self, "cuda_graphs", False)
            if "row_length_multiple" in filled:  # the padding is only for the graphs
                object.__setattr__(self, "row_length_multiple", 0)
        if "liger_kernels" in filled and self.liger_kernels and (self.compile or not liger_runs_here()):
            object.__setattr__(self, "liger_kernels", False)  # likewise: set it yourself to be told what is missing

    @property
    def needs_launch(self) -> bool:
        """Whether the stage runs as several processes under `accelerate launch`."""
        return self.num_processes > 1 or self.accelerate_config is not None

    @property
    def replayable(self) -> bool:
        """Whether the settings let train.cuda_graphs replay the layers: one micro-batch per optimiser step, one
        process, no quantization."""
        return self.grad_accum == 1 and not self.needs_launch and self.quantization == "none"

    def validate(self) -> None:
        require(
            not self.cuda_graphs or self.row_length_multiple > 0,
            "train.cuda_graphs",
            "needs a train.row_length_multiple, e.g. 256 (a CUDA graph is recorded for every new row length)",
        )
        require(
            not self.cuda_graphs or self.replayable,
            "train.cuda_graphs",
            "needs train.grad_accum: 1, one process and train.quantization: none (the replayed backward writes the "
            "gradients into buffers of its own)",
        )
        require(
            not (self.compile and self.liger_kernels),
            "train.liger_kernels",
            "can't be compiled (train.compile: dynamo fails inside Liger's norm); set one of them to false",
        )
        require(
            self.row_length_multiple == 0 or self.packing,
            "train.row_length_multiple",
            "pads packed rows: it needs train.packing: true (or 0)",
        )
        require(
            self.method == "lora" or self.quantization == "none",
            "train.quantization",
            "must be none with train.method: full (4-bit weights can't be trained)",
        )
        require(
            not (self.distributed == "fsdp" and "8bit" in self.optim),
            "train.optim",
            f"{self.optim} does not work with train.distributed: fsdp (FSDP can't shard bitsandbytes' 8-bit optimiser "
            "states); use adamw_torch",
        )
