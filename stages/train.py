"""Stage train: LoRA/QLoRA fine-tuning of the student on data/train.jsonl -> models/adapter/.

With train.num_processes > 1 (or train.accelerate_config) the script re-runs itself under `accelerate launch`, one
process per GPU, and the main process writes the outputs. An interrupted run resumes from its last checkpoint
(models/checkpoints/) when re-run with the same inputs.
"""

from redistill import paths
from redistill.errors import run_stage
from redistill.io import read_jsonl, write_json
from redistill.launch import is_launched, is_main_process, launch
from redistill.params import load_block, read_params_file
from redistill.prompts import teacher_prompt
from redistill.student import StudentParams
from redistill.train_params import TrainParams
from redistill.training import check_hardware, train


def main() -> None:
    params = read_params_file()
    train_params = load_block(TrainParams, "train", params)
    student = load_block(StudentParams, "student", params)
    if train_params.needs_launch and not is_launched():
        check_hardware(train_params)
        launch(__file__, train_params.num_processes, train_params.distributed, train_params.accelerate_config)
        return
    system_prompt = student.prompt(teacher_prompt(params))
    metrics, _ = train(
        train_params,
        student,
        system_prompt,
        read_jsonl(paths.SPLITS["train"]),
        read_jsonl(paths.SPLITS["val"]),
        adapter_dir=paths.ADAPTER,
        checkpoints=paths.CHECKPOINTS,
        log_dir=paths.TRAIN_LOG,
    )
    if is_main_process():
        print(", ".join(f"{name} {value}" for name, value in metrics.items()))
        write_json(paths.METRICS / "train.json", metrics)


if __name__ == "__main__":
    run_stage(main)
