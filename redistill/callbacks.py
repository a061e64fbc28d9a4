"""Trainer callbacks of the train stage: a step clock for throughput, the progress bar, and the loss curve for
`dvc plots`."""

import time

from transformers import TrainerCallback
from transformers.integrations import DVCLiveCallback
from transformers.trainer_callback import ProgressCallback


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


class ExamplesSeenDVCLive(DVCLiveCallback):
    """DVCLive counts its own steps (one per log call); pin them to the number of training examples seen, so that
    the loss and eval-loss curves share an x axis, and runs that take different numbers of examples per optimiser
    step (the presets) compare like with like in `dvc plots diff`."""

    def __init__(self, examples_per_epoch: int, examples_per_step: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.examples_per_epoch, self.examples_per_step = examples_per_epoch, examples_per_step

    def examples_seen(self, global_step: int) -> int:
        steps_per_epoch = -(-self.examples_per_epoch // self.examples_per_step)  # the last step of an epoch is short
        epochs, steps = divmod(global_step, steps_per_epoch)
        return epochs * self.examples_per_epoch + min(steps * self.examples_per_step, self.examples_per_epoch)

    def on_log(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.step = self.examples_seen(state.global_step)
        return super().on_log(args, state, control, **kwargs)
