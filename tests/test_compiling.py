"""train.compile with train.cuda_graphs: the settings it needs, and on a CPU (no graphs there) eager's losses."""

import pytest
from test_training import tiny_train_params, train_tiny

from redistill.params import ParamError


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cuda_graphs": True, "compile": False, "row_length_multiple": 256}, "train.cuda_graphs needs train.compile"),
        ({"cuda_graphs": True, "compile": True, "row_length_multiple": 0}, "train.cuda_graphs needs train.compile"),
        ({"packing": False, "row_length_multiple": 256}, "train.row_length_multiple pads packed rows"),
    ],
)
def test_cuda_graphs_and_row_padding_refuse_the_settings_they_cannot_work_with(changes, message):
    with pytest.raises(ParamError, match=f"^params.yaml: {message}"):
        tiny_train_params(**{"packing": True, **changes}).validate()


def test_layers_compiled_for_cuda_graphs_train_as_eager_on_a_cpu(tiny_student, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # not the user's cache
    losses = {}
    for compiled in (False, True):
        params = tiny_train_params(
            packing=True, row_length_multiple=64, compile=compiled, cuda_graphs=compiled, max_steps=3
        )
        metrics = train_tiny(tiny_student, params, 12, tmp_path / str(compiled))
        losses[compiled] = metrics["final_loss"]
        assert metrics["cuda_graphs"] is compiled
    assert (tmp_path / "inductor").is_dir()  # the compile caches went where they were told
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)  # fp32, no dropout: the same numbers
