"""The evaluate stages' logic: each model answers every test sentence; answers are scored against the teacher's.

`evaluate` runs the students; `evaluate_teacher` models over the teacher's API (the post compared Groq's
Llama-3-8B). Two stages, so that a change to the teacher's code or params never re-runs a GPU evaluation.
"""

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redistill.decoding import Decoding
from redistill.generation import Generation, Generator
from redistill.liger import liger_problem, use_liger_kernels
from redistill.params import ParamError, distinct, each, naming, one_of, param, positive
from redistill.prompts import answer_text
from redistill.scoring import score
from redistill.triples import parse_answer

if TYPE_CHECKING:
    from redistill.models import LoadedModel

STUDENTS = ("base", "finetuned")


@dataclass(frozen=True)
class EvalParams:
    models: list[str] = param(
        "the students that answer the test split: `base` (untrained), `finetuned` (base + adapter)",
        each(one_of(*STUDENTS).noting("teacher models: evaluate_teacher.models")),
        distinct("a model"),
    )
    max_new_tokens: int = param("the answer cap, as in the post", positive)
    batch_size: int = param(
        "answers decoded together (on a GPU more is faster, see BENCHMARKS.md; memory grows with it); a sentence "
        "decoded as `decoding.samples` or `decoding.num_beams` rows takes that many",
        positive,
    )
    decoding: Decoding = param("how each answer is decoded (the defaults: greedy)")
    continuous_batching: bool = param(
        "on a GPU, rows that finish take the next sentence instead of waiting for their batch's longest answer "
        "([extract.md](extract.md#continuous-batching)); the same greedy answers; not with beam search"
    )
    live_column_attention: bool = param(
        "on a GPU, each decoding step reads only each row's own columns and the shared prefix, not the cache's "
        "whole width ([extract.md](extract.md#live-column-attention)); the same answers up to rounding; 1.12-1.17x "
        "sentences/s with continuous batching on an H200"
    )
    liger_kernels: bool = param(
        "on a GPU, the student decodes with Liger's fused norm, SwiGLU and rotary kernels (requirements-gpu.txt; "
        "[extract.md](extract.md#liger-kernels)); the same answers up to rounding; 1.09-1.18x sentences/s on an H200"
    )

    def validate(self) -> None:
        error = self.decoding.error(lambda name: f"evaluate.decoding.{name}")
        if error is not None:
            raise ParamError(f"params.yaml: {error}")
        if self.liger_kernels and (problem := liger_problem("evaluate.liger_kernels")):
            raise ParamError(f"params.yaml: {problem}")


@dataclass(frozen=True)
class TeacherComparisonParams:
    models: list[str] | None = param(
        "models over the teacher's provider to score on the test split too (the post compared Groq's Llama-3-8B: "
        "`[llama-3.1-8b-instant]`); `null`: none, no key needed",
        each(naming("a model")),
        distinct("a model"),
    )


def model_metrics(golds: list[str], outputs: list[Generation], seconds: float) -> dict:
    """Scores and behaviour of one model's answers to the test set."""
    parsed = [parse_answer(output.text) for output in outputs]
    lines = sum(len(p.triples) + len(p.malformed) + len(p.prose) for p in parsed)
    triples = sum(len(p.triples) for p in parsed)
    return {
        **score(list(zip(golds, [output.text for output in outputs], strict=True))),
        "well_formed_share": triples / lines if lines else 0.0,
        "ended_at_eos_share": sum(output.ended for output in outputs) / len(outputs),
        "mean_triples": triples / len(outputs),
        "sentences_per_second": len(outputs) / seconds if seconds else None,
        "seconds": seconds,
    }


def student_outputs(student: "LoadedModel", texts: list[str], params: EvalParams, name: str):
    started = time.monotonic()
    if params.liger_kernels:
        use_liger_kernels(student.model)
    generator = Generator(
        student.model,
        student.tokenizer,
        student.system_prompt,
        params.max_new_tokens,
        params.batch_size,
        decoding=params.decoding,
        continuous=params.continuous_batching,
        live_column_attention=params.live_column_attention,
    )
    outputs = generator.generate(texts, desc=name)
    return outputs, time.monotonic() - started


def teacher_outputs(completions: list, seconds: float) -> tuple[list[Generation], float]:
    """A teacher model's completions, as a student's generations."""
    return [Generation(c.text, c.finish_reason == "stop", c.completion_tokens) for c in completions], seconds


def scored(test: list[dict], outputs: dict[str, tuple[list[Generation], float]]) -> tuple[dict, list[dict]]:
    """Metrics per model and one prediction row per test sentence, from each model's (answers, seconds)."""
    golds = [answer_text(record["triples"]) for record in test]
    metrics = {name: model_metrics(golds, answers, seconds) for name, (answers, seconds) in outputs.items()}
    rows = [
        {"id": record["id"], "text": record["text"], "gold": gold}
        | {name: answers[index].text for name, (answers, _) in outputs.items()}
        for index, (record, gold) in enumerate(zip(test, golds, strict=True))
    ]
    return metrics, rows


def evaluate(params: EvalParams, test: list[dict], load_student) -> tuple[dict, list[dict]]:
    """Metrics per student and one prediction row per test sentence.

    ``load_student(name)`` gives the LoadedModel "base" or "finetuned", with the instruction it answers under. Each
    model is loaded only while it answers, so two never sit in memory together.
    """
    texts = [record["text"] for record in test]
    outputs = {}
    for name in params.models:
        student = load_student(name)
        outputs[name] = student_outputs(student, texts, params, name)
        del student
    metrics, rows = scored(test, outputs)
    for name in params.models:  # what produced the scores, beside them
        metrics[name]["decoding"] = params.decoding.settings()
    return metrics, rows


def score_lines(metrics: dict) -> list[str]:
    """One line of exact and lenient F1 per model, as the evaluate stages print them."""
    return [
        f"{name}: exact F1 {values['exact']['f1']:.3f}, lenient F1 {values['lenient']['f1']:.3f}"
        for name, values in metrics.items()
    ]


def plot_rows(metrics: dict) -> tuple[list[dict], list[dict]]:
    """Rows for `dvc plots` to draw as bars: F1 per model and scoring; well-formed and EOS shares per model."""
    f1 = [
        {"model": f"{name} ({mode})", "f1": values[mode]["f1"]}
        for name, values in metrics.items()
        for mode in ("exact", "lenient")
    ]
    answers = [
        {"model": f"{name} ({label})", "share": values[key]}
        for name, values in metrics.items()
        for key, label in (("well_formed_share", "well-formed lines"), ("ended_at_eos_share", "ended at EOS"))
    ]
    return f1, answers


def graphed_model(models: list[str]) -> str:
    """The model whose answers the test graph draws: the fine-tuned student where it was evaluated."""
    return "finetuned" if "finetuned" in models else models[0]
