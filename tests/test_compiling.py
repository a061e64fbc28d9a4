"""train.compile: on a CPU, eager's losses, with the compile caches where they were told; row padding's setting."""

import pytest
from test_training import tiny_train_params, train_tiny

from redistill.params import ParamError


def test_row_padding_needs_packed_rows():
    with pytest.raises(ParamError, match=r"^params.yaml: train.row_length_multiple pads packed rows"):
        tiny_train_params(packing=False, row_length_multiple=256).validate()


def test_compiled_layers_train_as_eager_on_a_cpu(tiny_student, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # not the user's cache
    losses = {}
    for compiled in (False, True):
        params = tiny_train_params(packing=True, row_length_multiple=64, compile=compiled, max_steps=3)
        metrics = train_tiny(tiny_student, params, 12, tmp_path / str(compiled))
        losses[compiled] = metrics["final_loss"]
        assert metrics["compile"] is compiled
    assert (tmp_path / "inductor").is_dir()  # the compile caches went where they were told
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)  # fp32, no dropout: the same numbers
