"""train.row_length_multiple: packed rows padded with one dummy example change no loss, gradient or token count."""

import pytest
import torch
from test_packing import examples, load, reference_varlen
from test_training import tiny_train_params, train_tiny
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from redistill import attention
from redistill.row_padding import ROW_PADDING, PaddedRows
from redistill.training import Objective, StudentTrainer, WithAnswerPositions


def collators(tokenizer, multiple: int):
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return packed, PaddedRows(packed, multiple, tokenizer.pad_token_id)


def test_a_padded_row_holds_the_examples_then_one_dummy_example_up_to_the_multiple():
    tokenizer, batch = examples()
    packed, padded = collators(tokenizer, 64)
    plain, row = packed(batch), padded(batch)
    length = plain["input_ids"].shape[1]
    padding = row[ROW_PADDING]
    assert 0 < padding < 64 and row["input_ids"].shape[1] == length + padding and (length + padding) % 64 == 0
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(row[key][:, :length], plain[key])
    assert (row["labels"][:, length:] == -100).all() and (row["input_ids"][:, length:] == tokenizer.pad_token_id).all()
    assert row["position_ids"][0, length:].tolist() == list(range(padding))  # an example of its own
    assert row["cu_seq_lens_q"].tolist() == [*plain["cu_seq_lens_q"].tolist(), length + padding]
    assert row["cu_seq_lens_q"] is row["cu_seq_lens_k"] and row["cu_seq_lens_q"].dtype == torch.int32
    assert row["max_length_q"] == row["max_length_k"] == length + padding  # one value per row length
    assert row["seq_idx"][0, length:].unique().tolist() == [len(batch)]
    exact = PaddedRows(packed, length, tokenizer.pad_token_id)(batch)  # a row of a multiple's length gets one too
    assert exact[ROW_PADDING] == length and len(exact["cu_seq_lens_q"]) == len(row["cu_seq_lens_q"])
    assert torch.equal(exact["input_ids"][:, :length], plain["input_ids"])


def loss_and_gradients(model, inputs):
    from types import SimpleNamespace

    trainer = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False), objective=Objective())
    model.zero_grad()
    loss = StudentTrainer.compute_loss(trainer, model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["sdpa", "varlen"])
def test_padding_changes_no_loss_or_gradient(tiny_student, monkeypatch, path):
    from peft import LoraConfig, get_peft_model

    tokenizer, batch = examples()
    packed, padded = collators(tokenizer, 64)
    model = load(tiny_student, "sdpa")
    if path == "varlen":  # the GPU's path, through the per-example reference of the kernel
        monkeypatch.setattr(attention, "varlen_attn", reference_varlen)
        attention.use_packed_attention(model)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(model, lora)
    loss, grads = loss_and_gradients(model, WithAnswerPositions(packed)(batch))
    padded_loss, padded_grads = loss_and_gradients(model, WithAnswerPositions(padded)(batch))
    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == padded_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_training_on_padded_rows_learns_the_same_and_counts_only_the_examples_tokens(tiny_student, tmp_path):

    runs = {
        multiple: train_tiny(
            tiny_student,
            tiny_train_params(packing=True, row_length_multiple=multiple, max_steps=4),
            16,
            tmp_path / str(multiple),
        )
        for multiple in (0, 64)
    }
    assert runs[64]["tokens_seen"] == runs[0]["tokens_seen"] > 0
    assert runs[64]["row_length_multiple"] == 64
    assert runs[64]["final_loss"] == pytest.approx(runs[0]["final_loss"], rel=1e-4)
