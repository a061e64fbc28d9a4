"""Stage synthesize: ask the teacher for the triples of each sentence -> data/labeled.jsonl.

Answers go to a journal as they arrive, so an interrupted run resumes and an unchanged re-run makes no calls. An
unusable answer (no content, cut at max_tokens, no triple) is asked again up to teacher.reask times; sentences that
still have none are named in one warning line.
"""

import sys
from functools import partial

from redistill import paths
from redistill.errors import run_stage
from redistill.io import read_jsonl, write_json, write_jsonl
from redistill.params import load_block, read_params_file
from redistill.synthesis import label_sentences, summary_line, unusable_warning
from redistill.teacher import TeacherParams, make_teacher
from redistill.teacher.journal import TeacherJournal


def main() -> None:
    params = load_block(TeacherParams, "teacher", read_params_file())
    sentences = read_jsonl(paths.SENTENCES)
    # dvc.lock records the replay cassette: read it (and refuse a broken one) even when the journal answers everything.
    replay = make_teacher(params) if params.provider == "replay" else None
    teacher_factory = (lambda: replay) if replay is not None else partial(make_teacher, params)
    with TeacherJournal(paths.TEACHER_JOURNAL) as journal:
        labeled, stats = label_sentences(sentences, params, teacher_factory, journal)
    print(summary_line(stats))
    warning = unusable_warning(stats, params)
    if warning:
        print(warning, file=sys.stderr)
    write_jsonl(paths.LABELED, labeled)
    write_json(paths.METRICS / "synthesize.json", stats)


if __name__ == "__main__":
    run_stage(main)
