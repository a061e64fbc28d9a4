"""Packed (padding-free) batches and the labelled-positions loss on a tiny random Llama: same logits, same loss."""

from types import SimpleNamespace

import pytest
import torch
from test_training import tiny_train_params, train_tiny
from tiny_model import build_tokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from redistill import attention
from redistill.params import ParamError
from redistill.prompts import DEFAULT_SYSTEM_PROMPT, training_example
from redistill.train_params import PRESETS
from redistill.training import ANSWER_POSITIONS, Objective, StudentTrainer, WithAnswerPositions

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


def packed_and_alone_logits(packed_model, alone_model, tokenizer, batch, device: str = "cpu"):
    """(logits in one padding-free row, logits run alone) of each example of ``batch``."""
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(batch)
    assert packed["input_ids"].shape == (1, sum(len(example["input_ids"]) for example in batch))
    assert "attention_mask" not in packed  # no padding anywhere
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        # As in training: with a KV cache, transformers drops the per-example mask and examples see each other.
        together = packed_model(**inputs, use_cache=False).logits[0].float()
        start = 0
        for example in batch:
            end = start + len(example["input_ids"])
            alone = alone_model(input_ids=torch.tensor([example["input_ids"]], device=device)).logits[0].float()
            yield together[start:end], alone
            start = end


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_changes_no_examples_logits(tiny_student, attention):
    tokenizer, batch = examples()
    model = load(tiny_student, attention)
    for packed, alone in packed_and_alone_logits(model, model, tokenizer, batch):
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)  # nothing leaks from the example before


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **options):
    """PyTorch's varlen kernel, computed one example at a time with SDPA (the kernel itself runs on CUDA only)."""
    causal = options.get("window_size") == (-1, 0) or options.get("is_causal", False)
    # The longest example's length bounds the kernel's work per example: padded rows pass the row's length.
    assert causal and cu_seq_q is cu_seq_k and max_q == max_k >= int(cu_seq_q.diff().max())
    assert options.get("enable_gqa", False) or key.shape[1] == query.shape[1]
    pieces = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (states[start:end].transpose(0, 1) for states in (query, key, value))
        scale = options.get("scale")
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=options.get("enable_gqa", False)
        )
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


@pytest.mark.parametrize(
    "keywords",
    [
        {"window_size", "enable_gqa", "scale"},  # PyTorch 2.12 and later (the pinned 2.13)
        {"window_size", "scale"},  # 2.11: key and value heads repeated for grouped-query attention
        {"is_causal"},  # 2.10
    ],
)
def test_packed_attention_gives_each_example_its_logits_alone(tiny_student, monkeypatch, keywords):
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen)
    monkeypatch.setattr(attention, "_KEYWORDS", keywords)
    causal = {"window_size": (-1, 0)} if "window_size" in keywords else {"is_causal": True}
    monkeypatch.setattr(attention, "_CAUSAL", causal)
    tokenizer, batch = examples()
    alone_model = load(tiny_student, "sdpa")
    packed_model = load(tiny_student, "sdpa")
    assert packed_model.config.num_key_value_heads < packed_model.config.num_attention_heads  # GQA is exercised
    attention.use_packed_attention(packed_model)
    for packed, alone in packed_and_alone_logits(packed_model, alone_model, tokenizer, batch):
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_packed_attention_refuses_a_padded_batch(tiny_student):
    tokenizer, batch = examples()
    model = load(tiny_student, "sdpa")
    attention.use_packed_attention(model)
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(batch)
    with pytest.raises(attention.PipelineError, match="packed attention needs padding-free batches"):
        model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False)


@pytest.mark.skipif(not attention.packed_attention_available(torch.bfloat16), reason="needs a CUDA GPU")
def test_the_varlen_kernel_matches_sdpa_per_example_on_the_gpu(tiny_student):
    from transformers import AutoModelForCausalLM

    tokenizer, batch = examples()
    alone_model, packed_model = (
        AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.bfloat16).cuda().eval() for _ in range(2)
    )
    attention.use_packed_attention(packed_model)
    for packed, alone in packed_and_alone_logits(packed_model, alone_model, tokenizer, batch, device="cuda"):
        torch.testing.assert_close(packed, alone, rtol=2e-2, atol=2e-2)  # bf16, two kernels


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_labelled_positions_loss_equals_the_full_logits_loss(tiny_student, padding_free):
    tokenizer, batch = examples()
    model = load(tiny_student, "sdpa")
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)
    inputs = WithAnswerPositions(collate)(batch)  # the trainer's collator: positions found on the host
    trainer = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False), objective=Objective())
    with torch.no_grad():
        # transformers' own loss: the mean over the labelled tokens, from every position's logits
        full = model(**{k: v for k, v in inputs.items() if k != ANSWER_POSITIONS}, use_cache=False).loss
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
    choices = "post, fast, low_memory, small_student"
    with pytest.raises(ParamError, match=rf"^params.yaml: train.preset must be one of {choices}, got 'x'$"):
        tiny_train_params(preset="x")


def test_packed_training_lowers_the_loss_with_the_steps_of_padded_training(tiny_student, tmp_path):

    runs = {
        packing: train_tiny(tiny_student, tiny_train_params(packing=packing, epochs=2.0), 16, tmp_path / str(packing))
        for packing in (False, True)
    }
    assert runs[True]["steps"] == runs[False]["steps"] == 8
    assert runs[True]["final_loss"] < 0.8 * runs[True]["train_loss"] * 2  # it learns
    assert abs(runs[True]["final_loss"] - runs[False]["final_loss"]) < 0.1 * runs[False]["final_loss"]


def test_skipping_peft_input_casts_under_bf16_autocast_changes_no_loss_or_gradient(tiny_student):
    """The stage trains with peft's cast of each projection's input to the fp32 adapter dtype turned off under bf16
    autocast: the products run in bf16 either way, so the loss and every adapter gradient must be the same."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoModelForCausalLM

    tokenizer, batch = examples()
    inputs = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.bfloat16)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora)  # adapter weights in fp32 over a bf16 base, as in training
    adapter = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in adapter.values()} == {torch.float32}
    results = []
    for casting in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(model, active=not casting):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in adapter.items()}))
    (loss_cast, grads_cast), (loss_plain, grads_plain) = results
    assert torch.equal(loss_cast, loss_plain)
    for name, grad in grads_cast.items():
        assert grad.abs().sum() > 0 and torch.equal(grad, grads_plain[name]), name
