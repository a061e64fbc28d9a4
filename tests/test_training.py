"""Prompt building, label masks, and the train and evaluate stages on a tiny random Llama (CPU, seconds)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, labeled_rows, write_jsonl
from tiny_model import build_model, build_tokenizer
from transformers import TrainerCallback
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from redistill.checkpoints import last_checkpoint
from redistill.errors import PipelineError
from redistill.generation import Generator
from redistill.io import read_jsonl
from redistill.models import load_student, load_trained, trained_with
from redistill.prompts import DEFAULT_SYSTEM_PROMPT, ensure_chat_template, prompt_ids, training_example
from redistill.student import StudentParams
from redistill.train_params import LoraParams, TrainParams
from redistill.training import Speedups, build_examples, train

TRIPLES = [["Marie Curie", "was born in", "Warsaw"], ["Marie Curie", "won", "Nobel Prizes"]]
TEXT = "Marie Curie was born in Warsaw and won two Nobel Prizes."


def tokenizer_with_pad_as_eos():
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # the post's set-up, which made its collator mask every EOS
    return tokenizer


def test_prompt_tokens_are_masked_and_the_answer_and_its_eos_are_labelled():
    tokenizer = tokenizer_with_pad_as_eos()
    example = training_example(tokenizer, TEXT, TRIPLES, DEFAULT_SYSTEM_PROMPT)
    prompt = prompt_ids(tokenizer, TEXT, DEFAULT_SYSTEM_PROMPT)
    ids, labels = example["input_ids"], example["labels"]
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert labels[-1] == tokenizer.eos_token_id  # the model learns to stop
    answer = tokenizer.decode(labels[len(prompt) :])
    assert answer == "Marie Curie|was born in|Warsaw\nMarie Curie|won|Nobel Prizes<|im_end|>"  # nothing after EOS


def test_the_collator_keeps_eos_labels_when_pad_is_eos():
    tokenizer = tokenizer_with_pad_as_eos()
    short = training_example(tokenizer, "A b.", [["A", "is", "b"]], DEFAULT_SYSTEM_PROMPT)
    long = training_example(tokenizer, TEXT, TRIPLES, DEFAULT_SYSTEM_PROMPT)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)([short, long])
    short_labels = batch["labels"][0].tolist()
    padding = len(long["input_ids"]) - len(short["input_ids"])
    assert short_labels[: len(short["labels"])] == short["labels"]  # EOS stays labelled
    assert short_labels[len(short["labels"]) :] == [-100] * padding  # padding (also EOS) is not
    assert batch["labels"][1].tolist()[-1] == tokenizer.eos_token_id


def test_fallback_chat_template_closes_turns_with_eos():
    tokenizer = build_tokenizer(chat_template=None, eos="</s>")
    with pytest.raises(PipelineError, match=r"has no chat template; set student\.chat_template_fallback: chatml"):
        ensure_chat_template(tokenizer, None, "my-model")
    ensure_chat_template(tokenizer, "chatml", "my-model")
    example = training_example(tokenizer, TEXT, TRIPLES, "Extract.")
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nExtract.</s>\n<|im_start|>user\n")
    assert example["labels"][-1] == tokenizer.convert_tokens_to_ids("</s>")


def test_max_seq_length_shorter_than_the_prompt_is_an_error():
    with pytest.raises(PipelineError, match=r"train.max_seq_length \(20\) is shorter than the prompt"):
        build_examples(tokenizer_with_pad_as_eos(), labeled_rows(1), DEFAULT_SYSTEM_PROMPT, 20)


def tiny_train_params(**changes) -> TrainParams:
    base = dict(
        preset="post",
        epochs=3.0,
        batch_size=4,
        grad_accum=1,
        learning_rate=5e-3,
        lr_scheduler="cosine",
        warmup_ratio=0.1,
        max_grad_norm=1.0,
        label_smoothing=0.0,
        neftune_alpha=None,
        loss="nll",
        optim="adamw_torch",
        gradient_checkpointing=False,
        max_seq_length=256,
        packing=False,
        compile=False,
        cuda_graphs=False,
        row_length_multiple=0,
        fused_lora=False,
        liger_kernels=False,
        group_by_length=True,
        seed=17,
        quantization="none",
        precision="auto",
        max_steps=-1,
        logging_steps=1,
        save_steps=50,
        num_processes=1,
        distributed="ddp",
        accelerate_config=None,
        method="lora",
        lora=LoraParams(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    return TrainParams(**{**base, **changes})


def train_tiny(student_folder, params: TrainParams, rows: int, out, validation: int = 0, **keywords) -> dict:
    """The train stage's training of the tiny student on ``rows`` labelled rows and ``validation`` held-out ones;
    its metrics. ``keywords`` go to train(): callbacks, speedups, log_dir (None: no DVCLive; a GPU image lacks it)."""
    student = StudentParams(
        model=str(student_folder), system_prompt=None, chat_template_fallback=None, attn_implementation="sdpa"
    )
    metrics, _ = train(
        params,
        student,
        DEFAULT_SYSTEM_PROMPT,
        labeled_rows(rows),
        labeled_rows(validation, start=100),
        adapter_dir=out / "adapter",
        checkpoints=out / "checkpoints",
        **{"log_dir": out / "log", **keywords},
    )
    return metrics


def test_training_lowers_the_loss_and_the_saved_adapter_reloads_identically(tiny_student, tmp_path):
    student = StudentParams(
        model=str(tiny_student), system_prompt=None, chat_template_fallback=None, attn_implementation="sdpa"
    )
    metrics, model = train(
        tiny_train_params(),
        student,
        DEFAULT_SYSTEM_PROMPT,
        labeled_rows(16),
        labeled_rows(4, start=100),
        adapter_dir=tmp_path / "adapter",
        checkpoints=tmp_path / "checkpoints",
        log_dir=tmp_path / "log",
    )
    losses = [
        float(line.split("\t")[-1]) for line in (tmp_path / "log/plots/metrics/loss.tsv").read_text().splitlines()[1:]
    ]
    assert metrics["steps"] == 12 and len(losses) == 12 and losses[-1] < losses[0]
    assert metrics["tokens_seen"] > 0 and metrics["eval_loss"] is not None and metrics["device"] == "cpu"
    assert not (tmp_path / "checkpoints").exists()
    # Where the run's time went: loading and building, training, saving the adapter.
    assert metrics["setup_seconds"] > 0 and metrics["runtime_seconds"] > 0 and metrics["saving_seconds"] > 0
    saved = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= saved
    assert "model.safetensors" not in saved  # no base weights
    # What the adapter was trained with, for evaluate, extract and merge to read wherever they run.
    assert trained_with(tmp_path / "adapter") == {
        "base_model": str(tiny_student),
        "system_prompt": DEFAULT_SYSTEM_PROMPT,
    }

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    tokenizer.pad_token = tokenizer.eos_token
    texts = [row["text"] for row in labeled_rows(5, start=200)]
    model.eval()
    before = Generator(model, tokenizer, DEFAULT_SYSTEM_PROMPT, 12, 2).generate(texts, progress=False)
    reloaded = load_trained(str(tmp_path / "adapter"), device="cpu").model
    after = Generator(reloaded, tokenizer, DEFAULT_SYSTEM_PROMPT, 12, 2).generate(texts, progress=False)
    assert [g.text for g in before] == [g.text for g in after]


@pytest.mark.parametrize(
    ("objective", "against_plain"),
    [
        ({"label_smoothing": 0.2}, "higher"),  # a spread target is further from any prediction than a one-hot one
        ({"loss": "dft"}, "lower"),  # each token's loss scaled by its probability, below 1
        ({"neftune_alpha": 50.0}, "different"),  # noisy embeddings, so another loss from the first step
    ],
)
def test_each_training_objective_reaches_the_trainer(tiny_student, tmp_path, objective, against_plain):
    def first_loss(**changes) -> float:
        out = tmp_path / "-".join(map(str, changes.values())) if changes else tmp_path / "plain"
        train_tiny(tiny_student, tiny_train_params(max_steps=1, **changes), 4, out)
        return float((out / "log/plots/metrics/loss.tsv").read_text().splitlines()[1].split("\t")[-1])

    plain, changed = first_loss(), first_loss(**objective)
    outcome = {"higher": changed > plain + 1e-3, "lower": changed < plain - 1e-3}
    outcome["different"] = abs(changed - plain) > 1e-3
    assert outcome[against_plain], (plain, changed)


def test_full_fine_tuning_saves_a_whole_model_that_evaluate_extract_and_merge_load(tiny_student, tmp_path):
    from redistill.cli import main as redistill
    from redistill.models import is_adapter

    student = StudentParams(
        model=str(tiny_student), system_prompt=None, chat_template_fallback=None, attn_implementation="sdpa"
    )
    metrics, model = train(
        tiny_train_params(method="full", learning_rate=1e-3),
        student,
        "Short prompt.",
        labeled_rows(16),
        [],
        adapter_dir=tmp_path / "adapter",
        checkpoints=tmp_path / "checkpoints",
        log_dir=None,
    )
    assert metrics["method"] == "full" and metrics["final_loss"] < metrics["train_loss"] * 1.5
    assert metrics["trainable_parameters"] == sum(p.numel() for p in model.parameters())  # every weight
    folder = tmp_path / "adapter"
    assert not is_adapter(folder) and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert trained_with(folder) == {"base_model": str(tiny_student), "system_prompt": "Short prompt."}
    loaded = load_trained(str(folder), device="cpu")
    assert loaded.system_prompt == "Short prompt."
    texts = [row["text"] for row in labeled_rows(4, start=200)]
    model.eval()
    before = Generator(model, loaded.tokenizer, "Short prompt.", 12, 2).generate(texts, progress=False)
    after = Generator(loaded.model, loaded.tokenizer, "Short prompt.", 12, 2).generate(texts, progress=False)
    assert before == after
    assert redistill(["merge", "--model", str(folder), "-o", str(tmp_path / "merged")]) == 0
    assert trained_with(tmp_path / "merged")["system_prompt"] == "Short prompt."
    with pytest.raises(PipelineError, match=r"train\.quantization must be none with train\.method: full"):
        tiny_train_params(method="full", quantization="nf4").validate()


def test_batched_generation_matches_one_at_a_time(tiny_student):
    student = StudentParams(
        model=str(tiny_student), system_prompt=None, chat_template_fallback=None, attn_implementation="eager"
    )
    loaded = load_student(student, DEFAULT_SYSTEM_PROMPT, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = ["A b.", "Marie Curie was born in Warsaw and won two Nobel Prizes.", "Oslo is in Norway."]
    batched = Generator(model, tokenizer, DEFAULT_SYSTEM_PROMPT, 8, 3).generate(texts, progress=False)
    single = [
        Generator(model, tokenizer, DEFAULT_SYSTEM_PROMPT, 8, 1).generate([text], progress=False)[0] for text in texts
    ]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.new_tokens <= 8 for g in batched)


def run_stage(stage: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py")], capture_output=True, text=True, env=env
    )


def tiny_project(project, tmp_path, student: Path, **overrides):
    write_jsonl(tmp_path / "data/train.jsonl", labeled_rows(16))
    write_jsonl(tmp_path / "data/val.jsonl", labeled_rows(4, start=100))
    write_jsonl(tmp_path / "data/test.jsonl", labeled_rows(6, start=200))
    settings = {
        "student__model": str(student),
        "train__quantization": "none",
        "train__optim": "adamw_torch",
        "train__epochs": 2,
        "train__batch_size": 4,
        "train__grad_accum": 1,
        "train__learning_rate": 5e-3,
        "train__gradient_checkpointing": False,
        "evaluate__max_new_tokens": 16,
    }
    project(**{**settings, **overrides})
    params_path = tmp_path / "params.yaml"
    import yaml

    params = yaml.safe_load(params_path.read_text())
    params["train"]["lora"].update(r=8, alpha=16)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_train_and_evaluate_stages_on_a_tiny_model(project, tmp_path, tiny_student):
    tiny_project(project, tmp_path, tiny_student)
    trained = run_stage("train")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_stage("evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    train_metrics = json.loads(Path("metrics/train.json").read_text())
    assert train_metrics["steps"] == 8 and train_metrics["examples"] == 16
    eval_metrics = json.loads(Path("metrics/eval.json").read_text())
    assert set(eval_metrics) == {"base", "finetuned"}
    for values in eval_metrics.values():
        assert set(values) >= {
            "exact",
            "lenient",
            "well_formed_share",
            "ended_at_eos_share",
            "mean_triples",
            "sentences_per_second",
        }
        assert set(values["exact"]) == {"precision", "recall", "f1", "tp", "fp", "fn"}
    predictions = read_jsonl("data/predictions.jsonl")
    assert len(predictions) == 6 and set(predictions[0]) == {"id", "text", "gold", "base", "finetuned"}
    assert predictions[0]["gold"] == "Person200|was born in|Warsaw"
    assert "Test split: gold and finetuned triples" in Path("data/test_graph.html").read_text()
    errors = Path("data/errors.md").read_text()  # the report's scores are the stage's
    assert errors.startswith("# Where finetuned and the teacher disagree\n")
    assert f"exact F1 {eval_metrics['finetuned']['exact']['f1']:.3f}, lenient F1 " in errors
    plot = json.loads(Path("metrics/f1.json").read_text())
    assert [row["model"] for row in plot] == [
        "base (exact)",
        "base (lenient)",
        "finetuned (exact)",
        "finetuned (lenient)",
    ]


def test_interrupted_training_resumes_from_its_last_checkpoint(project, tmp_path, tiny_student):
    tiny_project(project, tmp_path, tiny_student, train__max_steps=400, train__save_steps=10, train__epochs=1)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "stages/train.py")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not list(Path("models/checkpoints").glob("checkpoint-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not Path("metrics/train.json").exists() and not Path("models/adapter").exists()
    result = run_stage("train")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert metrics["resumed_from"] and "checkpoint-" in metrics["resumed_from"] and metrics["steps"] == 400


def test_a_checkpoint_killed_while_being_saved_is_skipped_and_removed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert last_checkpoint(checkpoints, "run-a") is None
    for step, state in [(10, '{"global_step": 10}'), (20, None), (30, '{"global_st')]:
        folder = checkpoints / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_checkpoint(checkpoints, "run-a") == str(checkpoints / "checkpoint-10")
    assert sorted(path.name for path in checkpoints.glob("checkpoint-*")) == ["checkpoint-10"]
    assert last_checkpoint(checkpoints, "run-b") is None, "another run's checkpoints are never resumed"
    assert not list(checkpoints.glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"student__model": "models/nowhere"}, "student.model: no model folder at models/nowhere"),
        ({"train__quantization": "nf4"}, "train.quantization: nf4 needs a CUDA GPU"),
        ({"train__optim": "adamw_8bit"}, "train.optim: adamw_8bit needs a CUDA GPU"),
        ({"train__liger_kernels": True}, "train.liger_kernels needs a CUDA GPU"),
        ({"train__max_seq_length": 16}, "train.max_seq_length (16) is shorter than the prompt"),
        ({"student__chat_template_fallback": "alpaca"}, "student.chat_template_fallback must be null or one of chatml"),
        ({"train__lr_scheduler": "constant"}, "train.lr_scheduler must be one of"),
        (
            {"train__distributed": "fsdp", "train__optim": "adamw_8bit"},
            "train.optim adamw_8bit does not work with train.distributed: fsdp",
        ),
        ({"empty_train": True}, "the train split is empty"),
        ({"no_template": True}, "has no chat template; set student.chat_template_fallback: chatml"),
        ({"target_modules": ["qkv"]}, "train.lora.target_modules: Target modules {'qkv'} not found"),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(project, tmp_path, tiny_student, overrides, message):
    student = tiny_student
    if overrides.pop("no_template", False):
        student = build_model(tmp_path / "plain", chat_template=None, eos="</s>")
        overrides["student__chat_template_fallback"] = None
    empty = overrides.pop("empty_train", False)
    target_modules = overrides.pop("target_modules", None)
    tiny_project(project, tmp_path, student, **overrides)
    if target_modules:
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["train"]["lora"]["target_modules"] = target_modules
        Path("params.yaml").write_text(yaml.safe_dump(params))
    if empty:
        write_jsonl(tmp_path / "data/train.jsonl", [])
    result = run_stage("train")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert not Path("models/adapter").exists() and not Path("metrics/train.json").exists()


def test_the_loss_curves_x_axis_counts_the_examples_seen_with_a_short_last_step_per_epoch():
    from redistill.callbacks import ExamplesSeenDVCLive

    callback = ExamplesSeenDVCLive(examples_per_epoch=13, examples_per_step=4, live=None)
    assert [callback.examples_seen(step) for step in range(9)] == [0, 4, 8, 12, 13, 17, 21, 25, 26]


class LogTimes(TrainerCallback):
    """Each log's step, the optimiser steps ended when it was logged, and its values."""

    def __init__(self) -> None:
        self.ended, self.logs = 0, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ended += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        kept = {key: value for key, value in logs.items() if "runtime" not in key and "per_second" not in key}
        self.logs.append((state.global_step, self.ended, kept))


@pytest.mark.parametrize("max_steps", [-1, 7])  # whole epochs; stopped mid-epoch
def test_logging_a_step_late_logs_what_the_trainer_logs_then(tiny_student, tmp_path, max_steps):
    """Each step's loss and gradient norm are logged once the next step ran (its kernels queued on a GPU), with the
    state of the step they belong to: the same log entries, loss curve, checkpoints and metrics as logging at once."""
    params = tiny_train_params(max_steps=max_steps, save_steps=5, epochs=2.0, batch_size=3)
    runs = {}
    for late in (False, True):
        times, out = LogTimes(), tmp_path / f"late-{late}"
        metrics = train_tiny(
            tiny_student, params, 10, out, validation=3, callbacks=(times,), speedups=Speedups(log_a_step_late=late)
        )
        curve = (out / "log/plots/metrics/loss.tsv").read_text()
        runs[late] = (times, curve, (out / "log/plots/metrics/eval/loss.tsv").read_text(), metrics)
    (at_once, curve, eval_curve, metrics), (late, late_curve, late_eval_curve, late_metrics) = runs[False], runs[True]
    assert [entry[::2] for entry in late.logs] == [entry[::2] for entry in at_once.logs]
    assert len(at_once.logs) > 8 and "grad_norm" in late.logs[0][2]
    assert late_curve == curve and late_eval_curve == eval_curve
    for key in ("train_loss", "final_loss", "eval_loss", "steps", "tokens_seen"):
        assert late_metrics[key] == metrics[key], key
    steps_logged = [(step, ended) for step, ended, logs in late.logs if "loss" in logs and "eval_loss" not in logs]
    # Logged a step late, except where the next step's log waits anyway: at an epoch's end, a checkpoint or the end.
    assert sum(ended == step + 1 for step, ended in steps_logged) >= len(steps_logged) // 2
    assert all(ended == step for step, ended, _ in at_once.logs if "loss" in _)


class GradScales(TrainerCallback):
    """The divisor that fused AdamW read its gradients with at each optimiser step (None: none)."""

    def __init__(self) -> None:
        self.scales = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.scales.append(getattr(optimizer.optimizer, "grad_scale", None))


def test_clipping_inside_fused_adamw_trains_as_the_trainers_clipping(tiny_student, tmp_path):
    """Speedups.clip_in_optimizer: the same gradient norms logged, the same losses and adapter, up to rounding;
    and the clipping bites (a run without it ends elsewhere)."""
    from safetensors.torch import load_file

    runs = {}
    for name, clip, inside in (("trainer", 0.05, False), ("optimizer", 0.05, True), ("none", 1e9, True)):
        params = tiny_train_params(optim="adamw_torch_fused", max_grad_norm=clip, max_steps=4, learning_rate=5e-2)
        times, scales, out = LogTimes(), GradScales(), tmp_path / name
        speedups = Speedups(clip_in_optimizer=inside)
        train_tiny(tiny_student, params, 10, out, callbacks=(times, scales), speedups=speedups)
        logs = [logs for _, _, logs in times.logs if "loss" in logs]
        runs[name] = (logs, scales.scales, load_file(out / "adapter" / "adapter_model.safetensors"))
    (trainer_logs, trainer_scales, trainer_adapter), (logs, scales, adapter) = runs["trainer"], runs["optimizer"]
    assert trainer_scales == [None] * 4 and all(scale > 1 for scale in scales)  # each step clipped, in AdamW
    for ours, theirs in zip(logs, trainer_logs, strict=True):
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    for name, weight in trainer_adapter.items():
        torch.testing.assert_close(adapter[name], weight, rtol=1e-4, atol=1e-6)
    unclipped = runs["none"][2]
    assert max((unclipped[name] - weight).abs().max() for name, weight in adapter.items()) > 1e-3


class Saves(TrainerCallback):
    """The steps at which the trainer wrote a checkpoint."""

    def __init__(self) -> None:
        self.steps = []

    def on_save(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.parametrize("skip", [False, True])
def test_no_checkpoint_is_written_after_the_last_step(tiny_student, tmp_path, skip):
    """Speedups.no_checkpoint_at_end: the interval's checkpoints as before, none after the last step (save_adapter
    writes the adapter next)."""
    saves = Saves()
    params = tiny_train_params(max_steps=5, save_steps=2)
    speedups = Speedups(no_checkpoint_at_end=skip)
    train_tiny(tiny_student, params, 10, tmp_path, callbacks=(saves,), speedups=speedups)
    assert saves.steps == ([2, 4] if skip else [2, 4, 5])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and not (tmp_path / "checkpoints").exists()


def test_a_resumed_run_keeps_the_loss_log_up_to_its_checkpoint(tmp_path):
    """A run killed after its checkpoint logged further, perhaps while writing: DVCLive's summary (rewritten in place
    at every log) cut short would stop DVCLive's resume (seen once in CI, in the interrupted-training test above),
    and the curves' rows past the checkpoint would be logged twice. A whole summary and the rows up to the
    checkpoint's step (in examples seen: 4 a step here) are kept."""
    from types import SimpleNamespace

    from redistill.training import loss_log_callbacks

    batches = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "world_size": 1}
    config = SimpleNamespace(process_index=0, **batches)
    log = tmp_path / "log"
    curve = log / "plots" / "metrics" / "loss.tsv"
    curve.parent.mkdir(parents=True)
    curve.write_text("step\tloss\n4\t2.5\n8\t2.25\n12\t2.0\n1")  # the kill cut the last row
    summary = log / "metrics.json"
    summary.write_text('{"step": 12, "lo')
    assert loss_log_callbacks(config, log, resumed_at=2, examples=100)  # resumed from checkpoint-2: 8 examples
    assert not summary.exists()
    assert curve.read_text() == "step\tloss\n4\t2.5\n8\t2.25\n"
    summary.write_text('{"step": 8}')
    loss_log_callbacks(config, log, resumed_at=2, examples=100)
    assert summary.read_text() == '{"step": 8}' and curve.read_text() == "step\tloss\n4\t2.5\n8\t2.25\n"


def test_adapters_are_made_on_the_students_device_where_asked(tiny_student, tmp_path, monkeypatch):
    """Speedups.adapters_made_on_device: peft initialises the adapters where the student is (on a GPU, there) instead
    of on the host; on a CPU that is the host, so the same draws and the same run."""
    rank = 8
    devices: list[str] = []
    kaiming = torch.nn.init.kaiming_uniform_

    def recorded(tensor, *args, **kwargs):
        if rank in tensor.shape:  # an adapter's A (the model's own weights are loaded, not initialised)
            devices.append(tensor.device.type)
        return kaiming(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", recorded)
    params = tiny_train_params(max_steps=3, lora=LoraParams(r=rank, alpha=16, dropout=0.0, target_modules=["q_proj"]))
    runs = {}
    for on_device in (False, True):
        devices.clear()
        speedups = Speedups(adapters_made_on_device=on_device)
        metrics = train_tiny(tiny_student, params, 6, tmp_path / str(on_device), speedups=speedups, log_dir=None)
        runs[on_device] = set(devices), metrics["train_loss"]
    student_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert runs[False][0] == {"cpu"} and runs[True][0] == {student_device}
    if student_device == "cpu":
        assert runs[True][1] == runs[False][1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_input_gradients_train_as_autograds_additions(tiny_student, tmp_path, checkpointing):
    """Speedups.shared_input_gradients: the same adapter as with autograd adding the siblings' input gradients, with
    activation checkpointing too (its recomputed forward groups the siblings anew)."""
    from safetensors.torch import load_file

    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraParams(r=8, alpha=16, dropout=0.1, target_modules=every)
    params = tiny_train_params(max_steps=4, fused_lora=True, gradient_checkpointing=checkpointing, lora=lora)
    adapters = {}
    for shared in (False, True):
        out = tmp_path / str(shared)
        train_tiny(tiny_student, params, 8, out, speedups=Speedups(shared_input_gradients=shared), log_dir=None)
        adapters[shared] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    for name, weight in adapters[False].items():
        torch.testing.assert_close(adapters[True][name], weight, rtol=1e-4, atol=1e-7)
    assert any("lora_B" in name and weight.abs().max() > 0 for name, weight in adapters[False].items())
