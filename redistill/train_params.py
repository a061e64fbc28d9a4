"""The train block of params.yaml: its knobs, the named presets that fill the knobs left null, and their checks."""

from dataclasses import dataclass

from redistill.launch import STRATEGIES
from redistill.params import require

SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "cosine_with_min_lr")
PRECISIONS = ("auto", "bf16", "fp32")

# What each preset costs and buys is measured in docs/training.md. Every preset puts the post's 8 examples in each
# optimiser step (batch_size * grad_accum), so the learning rate and schedule mean the same under all three: 16 a step
# ran 1.5-1.9x faster on the 8B but scored lower on held-out sentences (BENCHMARKS.md).
PRESETS = {
    # The post's recipe: 4-bit QLoRA, recomputed activations, 4 x 2 padded batches, 8-bit AdamW. Fits a 16 GB card.
    "post": {
        "quantization": "nf4",
        "gradient_checkpointing": True,
        "batch_size": 4,
        "grad_accum": 2,
        "optim": "adamw_8bit",
        "packing": False,
        "save_steps": 50,
    },
    # bf16 LoRA, nothing recomputed, the 8 examples of a step packed into one row (no padding), fused AdamW, and a
    # checkpoint only every 500 steps: one (adapter + optimiser, 8 GB for the 8B) costs seconds. Needs ~40 GB.
    "fast": {
        "quantization": "none",
        "gradient_checkpointing": False,
        "batch_size": 8,
        "grad_accum": 1,
        "optim": "adamw_torch_fused",
        "packing": True,
        "save_steps": 500,
    },
    # The post's memory savers with the step's 8 examples packed into one row: the least memory per example.
    "low_memory": {
        "quantization": "nf4",
        "gradient_checkpointing": True,
        "batch_size": 8,
        "grad_accum": 1,
        "optim": "adamw_8bit",
        "packing": True,
        "save_steps": 50,
    },
}


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
    """The train block. The keys a preset sets may be null: they then take the preset's value (filled in on
    construction, so everything downstream, the checkpoint fingerprint included, sees the values that ran)."""

    preset: str
    epochs: float
    batch_size: int | None
    grad_accum: int | None
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    max_grad_norm: float
    optim: str | None
    gradient_checkpointing: bool | None
    max_seq_length: int
    packing: bool | None
    compile: bool
    group_by_length: bool
    seed: int
    quantization: str | None
    precision: str
    max_steps: int
    logging_steps: int
    save_steps: int | None
    num_processes: int
    distributed: str
    accelerate_config: str | None
    lora: LoraParams

    def __post_init__(self) -> None:
        require(self.preset in PRESETS, "train.preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

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
