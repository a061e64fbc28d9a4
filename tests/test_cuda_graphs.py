"""train.cuda_graphs: the settings it needs; on a CPU it trains as eager; on a GPU the replayed layers give eager's
loss and every adapter gradient."""

import pytest
import torch
from safetensors import safe_open
from test_packing import examples
from test_training import tiny_train_params, train_tiny
from transformers import TrainerCallback
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from redistill import attention
from redistill.cuda_graphs import (
    WARMUP_STEPS,
    GraphedLayers,
    call_tensors,
    cuda_graph_layers,
    static_call,
    uncached_autocast,
)
from redistill.fused_lora import fused_lora
from redistill.models import decoder_of
from redistill.params import ParamError
from redistill.row_padding import ROW_PADDING, PaddedRows
from redistill.train_params import LoraParams
from redistill.training import (
    EpochSeededLengthGroupedSampler,
    Speedups,
    StudentTrainer,
    one_batch_of_each_shape,
    row_shape,
)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"row_length_multiple": 0}, "train.cuda_graphs needs a train.row_length_multiple"),
        ({"grad_accum": 2}, "train.cuda_graphs needs train.grad_accum: 1"),
        ({"num_processes": 2}, "train.cuda_graphs needs train.grad_accum: 1, one process"),
    ],
)
def test_cuda_graphs_refuse_the_settings_they_cannot_work_with(changes, message):
    params = tiny_train_params(**{"packing": True, "cuda_graphs": True, "row_length_multiple": 64, **changes})
    with pytest.raises(ParamError, match=f"^params.yaml: {message}"):
        params.validate()


def test_the_fast_presets_graphs_give_way_to_the_settings_they_cannot_run_with():
    from_preset = {"preset": "fast", "cuda_graphs": None, "row_length_multiple": None, "fused_lora": None}
    fast = tiny_train_params(**from_preset, packing=True)
    assert (fast.cuda_graphs, fast.row_length_multiple, fast.fused_lora) == (True, 64, True)
    fast.validate()
    for changes in ({"grad_accum": 2}, {"num_processes": 2}, {"quantization": "nf4"}, {"packing": False}):
        params = tiny_train_params(**{**from_preset, "packing": True, **changes})
        assert (params.cuda_graphs, params.row_length_multiple, params.fused_lora) == (False, 0, True), changes
        params.validate()  # no error: the preset's speed-up is off, nothing the user set is refused
    explicit = tiny_train_params(**{**from_preset, "packing": True, "grad_accum": 2, "cuda_graphs": True})
    assert (explicit.cuda_graphs, explicit.row_length_multiple) == (True, 64)  # the user's own setting is checked
    with pytest.raises(ParamError, match=r"train\.cuda_graphs needs train\.grad_accum: 1"):
        explicit.validate()


def test_on_a_cpu_the_layers_train_as_eager_and_are_theirs_again_after(tiny_student, tmp_path):
    runs = {}
    for graphs in (False, True):
        params = tiny_train_params(packing=True, row_length_multiple=64, cuda_graphs=graphs, max_steps=3)
        runs[graphs] = train_tiny(tiny_student, params, 12, tmp_path / str(graphs))
    assert runs[True]["cuda_graphs"] is True
    assert runs[True]["final_loss"] == pytest.approx(runs[False]["final_loss"], rel=1e-6)
    keys = []
    for graphs in (False, True):
        with safe_open(tmp_path / str(graphs) / "adapter" / "adapter_model.safetensors", "pt") as adapter:
            keys.append(sorted(adapter.keys()))
    assert keys[0] == keys[1]  # the layers stayed registered where they were


def test_the_stand_in_is_the_decoders_layers_only_within_the_block(tiny):
    model, _ = tiny
    decoder = model.get_decoder()
    layers = decoder.layers
    with cuda_graph_layers(model):
        assert isinstance(decoder.layers, GraphedLayers)
        assert decoder.layers[: model.config.num_hidden_layers] == [decoder.layers]
        keys = list(model.state_dict())
    assert decoder.layers is layers
    assert keys == list(model.state_dict())


def test_a_recording_calls_compiled_layers_as_the_eager_steps_did(tiny):
    """Compiled layers (train.compile) guard on how they are called: a recording that called them with other
    arguments, other aliasing or another autocast state than the eager steps before it would compile them again
    inside the recording, where compiling can't run. Dynamo's guards are the same on a CPU."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny
    _, batch = examples()
    row = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(batch)
    layer = model.get_decoder().layers[0]
    calls = []
    hook = layer.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        model(**row, use_cache=False)
    finally:
        hook.remove()
    (hidden,), kwargs = calls[0]
    assert {"position_embeddings", "position_ids", "cu_seq_lens_q", "seq_idx"} <= set(kwargs)  # a packed row's call
    compiled = torch.compile(layer, backend="eager", dynamic=True)  # the guards are dynamo's, whatever the backend
    torch._dynamo.reset()
    counters.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # the trainer's autocast, its cache on
        with uncached_autocast(hidden.device):
            eager_step = compiled(hidden, **kwargs)
        inputs, static_hidden, static_kwargs = static_call(hidden, kwargs)
        with uncached_autocast(hidden.device):
            recorded = compiled(static_hidden, **static_kwargs)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(recorded, eager_step)
    # A replay copies the live call's tensors into the recorded ones, in this order: the same places in the call.
    assert [id(tensor) for tensor in call_tensors(static_hidden, static_kwargs)] == [id(tensor) for tensor in inputs]
    live = call_tensors(hidden, kwargs)
    assert [tensor.shape for tensor in live] == [tensor.shape for tensor in inputs]
    assert not {tensor.data_ptr() for tensor in live} & {tensor.data_ptr() for tensor in inputs}


class ForeseenRows(TrainerCallback):
    """The batches that `one_batch_of_each_shape` foresees at the run's start (as RecordRowShapesAhead does)."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        lengths = [len(ids) for ids in train_dataloader.dataset["input_ids"]]
        sampler = EpochSeededLengthGroupedSampler(args.train_batch_size, lengths, args.seed)  # the trainer's own
        self.batches = one_batch_of_each_shape(sampler, train_dataloader, args.train_batch_size, state.max_steps)


@pytest.mark.parametrize("max_steps", [-1, 5])  # two whole epochs; stopped in the second
def test_the_row_shapes_recorded_ahead_are_the_first_of_each_that_the_run_meets(
    tiny_student, tmp_path, monkeypatch, max_steps
):
    foreseen, met = ForeseenRows(), []
    training_step = StudentTrainer.training_step

    def step(self, model, inputs, *args, **kwargs):
        met.append(inputs)
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(StudentTrainer, "training_step", step)
    params = tiny_train_params(packing=True, row_length_multiple=16, batch_size=3, epochs=2.0, max_steps=max_steps)
    train_tiny(tiny_student, params, 10, tmp_path, callbacks=(foreseen,), log_dir=None)
    first_of_each: dict[tuple, dict] = {}
    for batch in met:
        first_of_each.setdefault(row_shape(batch), batch)
    assert [row_shape(batch) for batch in foreseen.batches] == list(first_of_each)
    assert len(first_of_each) >= 2  # rows of several lengths (and an epoch's last, short row)
    for batch, first in zip(foreseen.batches, first_of_each.values(), strict=True):
        assert torch.equal(batch["input_ids"], first["input_ids"].cpu())


@pytest.mark.skipif(not attention.packed_attention_available(torch.bfloat16), reason="needs a CUDA GPU")
# Fused LoRA writes the gradients into the graphs' buffers; with casts_once, reads the weights the graph cast; with
# shared, q and v build their input's gradient together.
@pytest.mark.parametrize(
    ("fused", "casts", "shared"), [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
)
def test_replayed_layers_give_eagers_loss_and_gradients_on_the_gpu(tiny_student, monkeypatch, fused, casts, shared):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer, batch = examples()
    collate = PaddedRows(
        DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True),
        64,
        tokenizer.pad_token_id,
    )
    rows = [collate(batch), collate(batch[:2])]  # two counts of examples: two recordings
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.bfloat16).cuda()
    attention.use_packed_attention(model)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, lora).train()

    def step(row) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in row.items() if k != ROW_PADDING}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    copies = []
    foreach_copy = torch._foreach_copy_

    def copy(buffers, gradients):
        copies.append(len(buffers))
        return foreach_copy(buffers, gradients)

    monkeypatch.setattr(torch, "_foreach_copy_", copy)
    weights = [parameter for parameter in model.parameters() if parameter.requires_grad]
    with fused_lora(model, active=fused, shared_input_gradients=shared):
        eager = [step(row) for row in rows]
        with cuda_graph_layers(model, casts_once=casts) as stand_in:
            for _ in range(WARMUP_STEPS + 2):  # eager steps at the first shape, recorded, then replayed
                replayed = [step(row) for row in rows]
            assert len(stand_in.recordings) == 2
            assert sum(stand_in.eager_runs.values()) == WARMUP_STEPS  # the second shape recorded at first sight
            with torch.no_grad():  # as an optimiser step does: the replays must follow the weights
                for weight in weights:
                    weight.add_(torch.randn_like(weight), alpha=0.05)
            replayed_after = [step(row) for row in rows]
        eager_after = [step(row) for row in rows]
    # Fused LoRA's gradients are in the shared buffers already; peft's are copied there in each backward graph;
    # with casts_once each forward graph casts the weights into their copies.
    assert copies == ([len(weights)] * 2 if casts else [] if fused else [len(stand_in.gradients)] * 2)
    pairs = zip(replayed + replayed_after, eager + eager_after, strict=True)
    for (loss, gradients), (eager_loss, eager_gradients) in pairs:
        assert loss == pytest.approx(eager_loss, rel=1e-3)
        for gradient, eager_gradient in zip(gradients, eager_gradients, strict=True):
            torch.testing.assert_close(gradient, eager_gradient, rtol=2e-2, atol=1e-3)
    assert eager_after[0][0] != pytest.approx(eager[0][0], rel=1e-4)  # the update changed the loss


class Recordings(TrainerCallback):
    """The count of recorded row shapes as each step begins, and each logged loss."""

    def __init__(self) -> None:
        self.counts, self.losses = [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.counts.append(len(decoder_of(model).layers.recordings))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.losses += [logs["loss"]] if "loss" in logs else []


@pytest.mark.skipif(not attention.packed_attention_available(torch.bfloat16), reason="needs a CUDA GPU")
def test_row_shapes_recorded_ahead_train_as_those_recorded_when_met_on_the_gpu(tiny_student, tmp_path):
    lora = LoraParams(r=16, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    params = tiny_train_params(
        packing=True, cuda_graphs=True, row_length_multiple=16, fused_lora=True, batch_size=3, epochs=2.0, lora=lora
    )
    runs = {}
    for ahead in (False, True):
        recordings = Recordings()
        speedups = Speedups(record_rows_ahead=ahead)
        out = tmp_path / str(ahead)
        train_tiny(tiny_student, params, 10, out, callbacks=(recordings,), speedups=speedups, log_dir=None)
        runs[ahead] = recordings
    met, ahead = runs[False], runs[True]
    assert len(set(ahead.counts)) == 1 and ahead.counts[0] == met.counts[-1] >= 2  # all before the first step
    assert met.counts[0] == 0
    assert ahead.losses == pytest.approx(met.losses, rel=1e-3)  # the same steps, the same dropout draws
