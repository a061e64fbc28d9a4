"""Packed (padding-free) batches and the labelled-positions loss on a tiny random Llama: same logits, same loss."""

from types import SimpleNamespace

import pytest
import torch
from conftest import labeled_rows
from test_training import tiny_train_params
from tiny_model import build_tokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from redistill.params import ParamError
from redistill.prompts import DEFAULT_SYSTEM_PROMPT, training_example
from redistill.train_params import PRESETS
from redistill.training import StudentTrainer

TEXTS = ["Marie Curie was born in Warsaw.", "The U.S. Army was founded in 1775 by the Continental Congress.", "A b."]


def examples():
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    triples = [[["Marie Curie", "was born in", "Warsaw"]], [["U.S. Army", "founded in", "1775"]], [["A", "is", "b"]]]
    return tokenizer, [
        training_example(tokenizer, t, r, DEFAULT_SYSTEM_PROMPT) for t, r in zip(TEXTS, triples, strict=True)
    ]


def load(folder, attention: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention, dtype=torch.float32).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_changes_no_examples_logits(tiny_student, attention):
    tokenizer, batch = examples()
    model = load(tiny_student, attention)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(batch)
    assert packed["input_ids"].shape == (1, sum(len(example["input_ids"]) for example in batch))
    assert "attention_mask" not in packed  # no padding anywhere
    with torch.no_grad():
        # As in training: with a KV cache, transformers drops the per-example mask and examples see each other.
        together = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for example in batch:
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            piece = together[start : start + len(example["input_ids"])]
            torch.testing.assert_close(piece, alone, rtol=1e-5, atol=1e-5)  # nothing leaks from the example before
            start += len(example["input_ids"])


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_labelled_positions_loss_equals_the_full_logits_loss(tiny_student, padding_free):
    tokenizer, batch = examples()
    model = load(tiny_student, "sdpa")
    inputs = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(batch)
    trainer = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False))
    with torch.no_grad():
        # transformers' own loss: the mean over the labelled tokens, from every position's logits
        full = model(**inputs, use_cache=False).loss
        ours, outputs = StudentTrainer.compute_loss(trainer, model, inputs, return_outputs=True)
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-6)
    answer_tokens = sum(1 for example in batch for label in example["labels"] if label != -100)
    assert outputs.logits.shape[-2] < inputs["input_ids"].shape[1] and outputs.logits.numel() >= answer_tokens


def test_a_preset_fills_the_keys_left_null_and_a_set_key_wins():
    fast = tiny_train_params(preset="fast", packing=None, batch_size=None, grad_accum=None, optim="adamw_torch")
    assert (fast.packing, fast.batch_size, fast.grad_accum) == (True, 8, 1)
    assert fast.optim == "adamw_torch"
    for values in PRESETS.values():  # the same examples per optimiser step: the same learning rate means the same
        assert values["batch_size"] * values["grad_accum"] == 8 and values.keys() == PRESETS["post"].keys()
    with pytest.raises(ParamError, match=r"^params.yaml: train.preset must be one of post, fast, low_memory, got 'x'$"):
        tiny_train_params(preset="x")


def test_packed_training_lowers_the_loss_with_the_steps_of_padded_training(tiny_student, tmp_path):
    from redistill.student import StudentParams
    from redistill.training import train

    student = StudentParams(str(tiny_student), None, None, "sdpa")
    runs = {}
    for packing in (False, True):
        metrics, _ = train(
            tiny_train_params(packing=packing, epochs=2.0),
            student,
            DEFAULT_SYSTEM_PROMPT,
            labeled_rows(16),
            [],
            adapter_dir=tmp_path / f"adapter-{packing}",
            checkpoints=tmp_path / f"checkpoints-{packing}",
            log_dir=None,
        )
        runs[packing] = metrics
    assert runs[True]["steps"] == runs[False]["steps"] == 8
    assert runs[True]["final_loss"] < 0.8 * runs[True]["train_loss"] * 2  # it learns
    assert abs(runs[True]["final_loss"] - runs[False]["final_loss"]) < 0.1 * runs[False]["final_loss"]
