"""Resumable training: a checkpoint is resumed only by the run that wrote it, and only when it is complete."""

import hashlib
import json
import shutil
from pathlib import Path


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
    return str(max(checkpoints, key=checkpoint_step)) if checkpoints else None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimiser step a checkpoint folder (``checkpoint-N``) was saved at."""
    return int(Path(checkpoint).name.split("-")[1])


def _is_complete(checkpoint: Path) -> bool:
    # The trainer writes the weights, the optimizer and the RNG state first and trainer_state.json last.
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True
