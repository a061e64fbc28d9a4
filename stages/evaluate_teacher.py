"""Stage evaluate_teacher: models over the teacher's API answer the test split, scored like the students.

The post compared Groq's Llama-3-8B with its fine-tuned student. `evaluate_teacher.models: null` compares none and
needs no key. Writes data/teacher_predictions.jsonl and metrics/eval_teacher.json.
"""

from dataclasses import replace

from redistill import paths
from redistill.errors import run_stage
from redistill.evaluation import TeacherComparisonParams, score_lines, scored, teacher_outputs
from redistill.io import read_jsonl, write_json, write_jsonl
from redistill.params import load_block, read_params_file
from redistill.synthesis import ask_teacher
from redistill.teacher import TeacherParams, make_teacher


def main() -> None:
    params = read_params_file()
    comparison = load_block(TeacherComparisonParams, "evaluate_teacher", params)
    teacher = load_block(TeacherParams, "teacher", params)
    teachers = {model: replace(teacher, model=model) for model in comparison.models or []}
    clients = {model: make_teacher(model_params) for model, model_params in teachers.items()}  # a missing key: now
    test = read_jsonl(paths.SPLITS["test"])
    texts = [record["text"] for record in test]
    outputs = {
        f"teacher:{model}": teacher_outputs(*ask_teacher(texts, model_params, clients[model]))
        for model, model_params in teachers.items()
    }
    metrics, rows = scored(test, outputs)
    for line in score_lines(metrics):
        print(line)
    write_jsonl(paths.TEACHER_PREDICTIONS, rows)
    write_json(paths.METRICS / "eval_teacher.json", metrics)


if __name__ == "__main__":
    run_stage(main)
