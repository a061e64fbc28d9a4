"""Where each stage reads and writes; dvc.yaml lists the same paths (tests/test_dvc.py checks they agree)."""

from pathlib import Path

PARAMS = Path("params.yaml")  # of the workspace the stage runs in: the project root, or demo/
SENTENCES = Path("data/sentences.jsonl")
LABELED = Path("data/labeled.jsonl")
TEACHER_JOURNAL = Path("data/teacher_journal.jsonl")
SPLITS = {name: Path(f"data/{name}.jsonl") for name in ("train", "val", "test")}
METRICS = Path("metrics")
PREDICTIONS = Path("data/predictions.jsonl")
TEACHER_PREDICTIONS = Path("data/teacher_predictions.jsonl")
TEST_GRAPH = Path("data/test_graph.html")  # gold and predicted triples of the test split, drawn
ERRORS = Path("data/errors.md")  # the test sentences where the graphed student and the teacher disagree most
BASE_MODEL = Path("models/base")
ADAPTER = Path("models/adapter")
CHECKPOINTS = Path("models/checkpoints")
TRAIN_LOG = METRICS / "train"
F1_PLOT = METRICS / "f1.json"
ANSWERS_PLOT = METRICS / "answers.json"
