import re

import pytest
from conftest import ROOT

from redistill import params_doc
from redistill.evaluation import EvalParams, TeacherComparisonParams
from redistill.params import ParamError, load_block, read_params_file
from redistill.sampling import SampleParams, is_local
from redistill.splitting import SplitParams
from redistill.student import StudentParams
from redistill.teacher import TeacherParams
from redistill.train_params import TrainParams


def block(section, **changes):
    params = read_params_file()
    params[section].update(changes)
    return params


@pytest.mark.usefixtures("project")
def test_the_shipped_params_load():
    params = read_params_file()
    assert load_block(SampleParams, "sample", params).max_chars == 170
    assert load_block(TeacherParams, "teacher", params).temperature == 0.5
    assert load_block(SplitParams, "split", params).seed == 17


@pytest.mark.usefixtures("project")
def test_the_hub_corpus_is_pinned_to_a_commit():
    # A branch name (or null: the default branch) moves under a committed dvc.lock; a commit does not.
    sample = load_block(SampleParams, "sample", read_params_file())
    assert not is_local(sample.source) and re.fullmatch(r"[0-9a-f]{40}", sample.revision or "")


@pytest.mark.usefixtures("project")
@pytest.mark.parametrize(
    ("cls", "section", "changes", "message"),
    [
        (SampleParams, "sample", {"min_chars": 200}, "sample.min_chars must be smaller than sample.max_chars"),
        (SampleParams, "sample", {"min_chars": -1}, "sample.min_chars must be >= 0"),
        (SampleParams, "sample", {"limit": 0}, "sample.limit must be positive"),
        (SampleParams, "sample", {"min_chars": "30"}, "sample.min_chars must be an integer, got '30'"),
        (SampleParams, "sample", {"max_chars": True}, "sample.max_chars must be an integer"),
        (SampleParams, "sample", {"min_char": 3}, "unknown key sample.min_char"),
        (TeacherParams, "teacher", {"provider": "anthropic"}, "teacher.provider must be one of groq, openai, replay"),
        (TeacherParams, "teacher", {"temperature": 3}, "teacher.temperature must be in [0, 2]"),
        (SplitParams, "split", {"test_size": -5}, "split.test_size as a count must be >= 0"),
        (SplitParams, "split", {"val_size": 1.5}, "split.val_size as a fraction must be in [0, 1)"),
        (SplitParams, "split", {"test_size": 0}, "split.test_size must be positive"),
        (SplitParams, "split", {"test_size": "ten"}, "split.test_size must be an integer or a number"),
        (EvalParams, "evaluate", {"models": ["base", "base"]}, "evaluate.models lists a model twice"),
        (TeacherComparisonParams, "evaluate_teacher", {"models": [" "]}, "evaluate_teacher.models entries must name"),
        (StudentParams, "student", {"model": ""}, "student.model must name a Hugging Face model id or a local folder"),
    ],
)
def test_bad_params_name_the_key(cls, section, changes, message):
    with pytest.raises(ParamError, match=re.escape(message)):
        load_block(cls, section, block(section, **changes))


@pytest.mark.usefixtures("project")
@pytest.mark.parametrize(
    ("cls", "section", "changes", "line"),
    [  # one of each kind of declared check, each error one whole line that names the key
        (TrainParams, "train", {"epochs": 0}, "params.yaml: train.epochs must be positive, got 0.0"),
        (TrainParams, "train", {"batch_size": -8}, "params.yaml: train.batch_size must be positive, got -8"),
        (TrainParams, "train", {"warmup_ratio": 1.0}, "params.yaml: train.warmup_ratio must be in [0, 1), got 1.0"),
        (TeacherParams, "teacher", {"top_p": 0}, "params.yaml: teacher.top_p must be in (0, 1], got 0.0"),
        (TeacherParams, "teacher", {"max_retries": -1}, "params.yaml: teacher.max_retries must be >= 0, got -1"),
        (
            TrainParams,
            "train",
            {"lr_scheduler": "constant"},
            "params.yaml: train.lr_scheduler must be one of cosine, linear, constant_with_warmup, cosine_with_min_lr, "
            "got 'constant'",
        ),
        (TeacherParams, "teacher", {"mode": "later"}, "params.yaml: teacher.mode must be online or batch, got 'later'"),
        (
            StudentParams,
            "student",
            {"chat_template_fallback": "alpaca"},
            "params.yaml: student.chat_template_fallback must be null or one of chatml, got 'alpaca'",
        ),
        (SampleParams, "sample", {"limit": 0}, "params.yaml: sample.limit must be positive or null, got 0"),
    ],
)
def test_each_kind_of_declared_check_names_the_key_in_one_line(cls, section, changes, line):
    with pytest.raises(ParamError) as error:
        load_block(cls, section, block(section, **changes))
    assert str(error.value) == line


@pytest.mark.usefixtures("project")
def test_the_nested_blocks_keys_are_checked_with_their_full_names():
    params = read_params_file()
    params["train"]["lora"]["dropout"] = 1.0
    with pytest.raises(ParamError, match=re.escape("train.lora.dropout must be in [0, 1), got 1.0")):
        load_block(TrainParams, "train", params)
    params = read_params_file()
    params["teacher"]["limits"]["rpm"] = 0
    with pytest.raises(ParamError, match=re.escape("teacher.limits.rpm must be positive or null, got 0")):
        load_block(TeacherParams, "teacher", params)


@pytest.mark.usefixtures("project")
def test_null_passes_the_checks_where_the_type_admits_it_and_a_preset_fills_what_it_sets():
    params = read_params_file()
    params["sample"]["limit"] = None
    assert load_block(SampleParams, "sample", params).limit is None
    params["train"].update(preset="fast", batch_size=None)
    assert load_block(TrainParams, "train", params).batch_size == 8


def test_docs_params_md_is_generated_from_the_declarations():
    doc = (ROOT / params_doc.DOC).read_text(encoding="utf-8")
    expected = params_doc.render(doc, read_params_file(ROOT / "params.yaml"))
    assert doc == expected, f"docs/params.md is stale: run `make docs` ({params_doc.COMMAND})"


def test_a_stale_table_is_rewritten_and_the_prose_around_it_kept():
    doc = (ROOT / params_doc.DOC).read_text(encoding="utf-8")
    shipped = read_params_file(ROOT / "params.yaml")
    stale = doc.replace("| `train.epochs` | `2` |", "| `train.epochs` | `3` |").replace("All in", "Everything in")
    assert params_doc.render(stale, shipped) == doc.replace("All in", "Everything in") != doc
