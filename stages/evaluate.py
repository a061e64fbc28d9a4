"""Stage evaluate: the base and the fine-tuned student answer the test split; scored against the teacher's labels.

Writes data/predictions.jsonl, metrics/eval.json, metrics/f1.json and metrics/answers.json (drawn by `dvc plots
show`), and data/test_graph.html, the test split's gold and predicted triples as a knowledge graph (open it in a
browser), and data/errors.md, the sentences where that student and the teacher disagree most, their gold and
predicted triples side by side.
"""

from redistill import paths
from redistill.errors import run_stage
from redistill.evaluation import EvalParams, evaluate, graphed_model, plot_rows, score_lines
from redistill.graph import gold_and_predicted_graph, write_html
from redistill.io import read_jsonl, write_json, write_jsonl
from redistill.models import load_student, load_trained
from redistill.params import load_block, read_params_file
from redistill.prompts import teacher_prompt
from redistill.report import write_error_report
from redistill.student import StudentParams


def main() -> None:
    params = read_params_file()
    eval_params = load_block(EvalParams, "evaluate", params)
    student = load_block(StudentParams, "student", params)
    system_prompt = student.prompt(teacher_prompt(params))

    def load(name: str):  # the fine-tuned student answers under the instruction its adapter records
        if name == "base":
            return load_student(student, system_prompt)
        return load_trained(str(paths.ADAPTER), attention=student.attn_implementation)

    test = read_jsonl(paths.SPLITS["test"])
    metrics, rows = evaluate(eval_params, test, load)
    for line in score_lines(metrics):
        print(line)
    write_jsonl(paths.PREDICTIONS, rows)
    write_json(paths.METRICS / "eval.json", metrics)
    f1_rows, answer_rows = plot_rows(metrics)
    write_json(paths.F1_PLOT, f1_rows)
    write_json(paths.ANSWERS_PLOT, answer_rows)
    model = graphed_model(eval_params.models)
    write_html(gold_and_predicted_graph(test, rows, model), paths.TEST_GRAPH, f"Test split: gold and {model} triples")
    write_error_report(paths.ERRORS, rows, model)


if __name__ == "__main__":
    run_stage(main)
