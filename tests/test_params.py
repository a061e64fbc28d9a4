import re

import pytest

from redistill.params import ParamError, load_block, read_params_file
from redistill.sampling import SampleParams, is_local
from redistill.splitting import SplitParams
from redistill.teacher import TeacherParams


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
    ],
)
def test_bad_params_name_the_key(cls, section, changes, message):
    with pytest.raises(ParamError, match=re.escape(message)):
        load_block(cls, section, block(section, **changes))


@pytest.mark.usefixtures("project")
def test_missing_key_and_block():
    params = read_params_file()
    del params["split"]["seed"]
    with pytest.raises(ParamError, match=r"missing key split\.seed"):
        load_block(SplitParams, "split", params)
    with pytest.raises(ParamError, match="missing block 'nope'"):
        load_block(SplitParams, "nope", params)


def test_integers_are_accepted_as_floats(project):
    project(teacher__temperature=1)
    assert load_block(TeacherParams, "teacher", read_params_file()).temperature == 1.0


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamError, match="file not found"):
        read_params_file(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("sample: [unclosed")
    with pytest.raises(ParamError, match="not valid YAML"):
        read_params_file(tmp_path / "params.yaml")
