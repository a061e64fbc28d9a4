"""The evaluate stage's logic: each model answers every test sentence; answers are scored against the teacher's."""

import time
from dataclasses import dataclass

from redistill.generation import Generation, generate
from redistill.graph import Graph
from redistill.params import require
from redistill.prompts import answer_text
from redistill.scoring import score
from redistill.triples import clean_label, parse_answer

STUDENTS = ("base", "finetuned")
TEACHER_PREFIX = "teacher:"


@dataclass(frozen=True)
class EvalParams:
    models: list[str]
    max_new_tokens: int
    batch_size: int

    def validate(self) -> None:
        for name in self.models:
            require(
                name in STUDENTS or (name.startswith(TEACHER_PREFIX) and len(name) > len(TEACHER_PREFIX)),
                "evaluate.models",
                f"entries must be base, finetuned or teacher:<model name>, got {name!r}",
            )
        require(len(set(self.models)) == len(self.models), "evaluate.models", "lists a model twice")
        require(self.max_new_tokens > 0, "evaluate.max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        require(self.batch_size > 0, "evaluate.batch_size", f"must be positive, got {self.batch_size}")


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


def student_outputs(model, tokenizer, texts: list[str], system_prompt: str, params: EvalParams, name: str):
    started = time.monotonic()
    outputs = generate(model, tokenizer, texts, system_prompt, params.max_new_tokens, params.batch_size, desc=name)
    return outputs, time.monotonic() - started


def teacher_outputs(answer, texts: list[str]) -> tuple[list[Generation], float]:
    """A model over the teacher's API as one more to compare (the post compared Groq's Llama-3-8B)."""
    completions, seconds = answer(texts)
    return [Generation(c.text, c.finish_reason == "stop", c.completion_tokens) for c in completions], seconds


def evaluate(
    params: EvalParams, test: list[dict], load_student, teacher_answers, system_prompt: str
) -> tuple[dict, list]:
    """Metrics per model and one prediction row per test sentence.

    ``load_student(name)`` gives (model, tokenizer) for "base" or "finetuned"; ``teacher_answers(model_name)`` a
    function from sentences to that model's completions and the seconds they took. Each model is loaded only
    while it answers, so two never sit in memory together.
    """
    texts = [record["text"] for record in test]
    golds = [answer_text(record["triples"]) for record in test]
    metrics, answers = {}, {}
    for name in params.models:
        if name.startswith(TEACHER_PREFIX):
            outputs, seconds = teacher_outputs(teacher_answers(name.removeprefix(TEACHER_PREFIX)), texts)
        else:
            model, tokenizer = load_student(name)
            outputs, seconds = student_outputs(model, tokenizer, texts, system_prompt, params, name)
            del model
        metrics[name] = model_metrics(golds, outputs, seconds)
        answers[name] = outputs
    rows = [
        {"id": record["id"], "text": record["text"], "gold": gold}
        | {name: answers[name][index].text for name in params.models}
        for index, (record, gold) in enumerate(zip(test, golds, strict=True))
    ]
    return metrics, rows


def f1_plot_rows(metrics: dict) -> list[dict]:
    """One row per model and mode, for `dvc plots` to draw as bars."""
    return [
        {"model": f"{name} ({mode})", "f1": values[mode]["f1"]}
        for name, values in metrics.items()
        for mode in ("exact", "lenient")
    ]


def graphed_model(models: list[str]) -> str:
    """The model whose answers the test graph draws: the fine-tuned student where it was evaluated."""
    return "finetuned" if "finetuned" in models else models[0]


def gold_and_predicted_graph(test: list[dict], rows: list[dict], model: str) -> Graph:
    """The test split's gold triples and ``model``'s predicted ones in one graph, each edge marked by where it
    comes from (an edge in both is drawn as correct)."""
    graph = Graph()
    for record, row in zip(test, rows, strict=True):
        for triple in record["triples"]:
            graph.add(triple, record["id"], record["text"], "gold")
        for triple in clean_label(row[model]).triples:
            graph.add(triple, record["id"], record["text"], "predicted")
    return graph
