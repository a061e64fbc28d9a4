"""Stage evaluate: base and fine-tuned student (and optionally a teacher) answer the test split; scored.

Writes data/predictions.jsonl, metrics/eval.json, metrics/f1.json (drawn by `dvc plots show`) and
data/test_graph.html, the test split's gold and predicted triples as a knowledge graph (open it in a browser).
"""

from dataclasses import replace

import torch

from redistill import paths
from redistill.errors import run_stage
from redistill.evaluation import EvalParams, evaluate, f1_plot_rows, gold_and_predicted_graph, graphed_model
from redistill.graph import write_html
from redistill.io import read_jsonl, write_json, write_jsonl
from redistill.params import load_block, read_params_file
from redistill.student import StudentParams, load_finetuned, load_model, load_tokenizer
from redistill.synthesis import ask_teacher
from redistill.teacher import TeacherParams, make_teacher


def main() -> None:
    params = read_params_file()
    eval_params = load_block(EvalParams, "evaluate", params)
    student = load_block(StudentParams, "student", params)
    teacher = load_block(TeacherParams, "teacher", params)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)

    def load_student(name: str):
        if name == "base":
            return load_model(student, dtype, device), load_tokenizer(student)
        return load_finetuned(student, paths.ADAPTER, dtype, device), load_tokenizer(student, source=paths.ADAPTER)

    def teacher_answers(model: str):
        params = replace(teacher, model=model)
        return lambda texts: ask_teacher(texts, params, make_teacher(params))

    test = read_jsonl(paths.SPLITS["test"])
    metrics, rows = evaluate(eval_params, test, load_student, teacher_answers, student.prompt(teacher.prompt))
    for name, values in metrics.items():
        print(f"{name}: exact F1 {values['exact']['f1']:.3f}, lenient F1 {values['lenient']['f1']:.3f}")
    write_jsonl(paths.PREDICTIONS, rows)
    write_json(paths.METRICS / "eval.json", metrics)
    write_json(paths.F1_PLOT, f1_plot_rows(metrics))
    model = graphed_model(eval_params.models)
    write_html(gold_and_predicted_graph(test, rows, model), paths.TEST_GRAPH, f"Test split: gold and {model} triples")


if __name__ == "__main__":
    run_stage(main)
