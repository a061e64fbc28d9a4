"""train.fused_lora on a tiny random Llama: peft's loss and adapter gradients, dropout's draws included."""

import pytest
import torch
from test_packing import examples
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from redistill import fused_lora as fused

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # k_proj, gate_proj and up_proj stay plain: mixed siblings
EVERY_PROJECTION = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(tiny_student, dtype: torch.dtype, dropout: float, targets: list[str] = TARGETS):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=dtype)
    # Random B (not peft's zeros), so that every gradient and the adapter's share of the output are non-zero.
    config = LoraConfig(r=8, lora_alpha=24, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(0)  # the same adapter in every dtype
    return get_peft_model(base, config).train()


def loss_and_gradients(model, fused_on: bool, autocast: bool = False, seed: int = 3, shared: bool = False):
    """The loss of one batch and every adapter weight's gradient, with peft's forward or the fused one (``shared``:
    siblings' input gradients built together)."""
    from peft.helpers import disable_input_dtype_casting

    tokenizer, batch = examples()
    inputs = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(batch)
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout draws for both
    with (
        fused.fused_lora(model, active=fused_on, shared_input_gradients=shared) as switched,
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        disable_input_dtype_casting(model, active=autocast),  # as the stage trains under bf16
    ):
        adapted = sum("lora_A" in name for name, _ in model.named_parameters())
        assert switched == (adapted if fused_on else 0)
        loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


def error(result, reference) -> float:
    """The largest relative error of the loss and of each gradient against ``reference``."""
    (loss, grads), (ref_loss, ref_grads) = result, reference
    errors = [abs(loss - ref_loss) / abs(ref_loss)]
    errors += [(grads[n] - ref_grads[n]).norm() / ref_grads[n].norm() for n in ref_grads]
    return float(max(errors))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("targets", [TARGETS, EVERY_PROJECTION])
@pytest.mark.parametrize("shared", [False, True])
def test_fused_lora_gives_peft_s_loss_and_gradients_in_fp32(tiny_student, dropout, targets, shared):
    model = lora_model(tiny_student, torch.float32, dropout, targets)
    peft_result = loss_and_gradients(model, fused_on=False)
    assert all(grad.abs().sum() > 0 for grad in peft_result[1].values())
    # fp32 rounding (addmm sums in its own order; 1.4e-6 seen on CI's CPU), ten times under the 1e-4 a 1% slip gives
    assert error(loss_and_gradients(model, fused_on=True, shared=shared), peft_result) < 1e-5


def test_siblings_hand_autograd_one_input_gradient_the_last_of_them(tiny_student, monkeypatch):
    """q, k and v (gate and up) each add their part to one input gradient, and only the last to run hands it to
    autograd, which then adds nothing; with k, gate and up plain, q and v still share theirs (autograd adds k's).
    The gradients are peft's (the test above)."""
    handed: list[tuple[int, bool]] = []  # (members, whether this backward handed the gradient on)
    add_up = fused.SharedGradient.add_up

    def recorded(self, gradient):
        result = add_up(self, gradient)
        handed.append((self.members, result is not None))
        return result

    monkeypatch.setattr(fused.SharedGradient, "add_up", recorded)
    tokenizer, batch = examples()
    inputs = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(batch)
    seen = {}
    for targets in (EVERY_PROJECTION, TARGETS):
        model = lora_model(tiny_student, torch.float32, 0.3, targets)
        handed.clear()
        with fused.fused_lora(model, shared_input_gradients=True):
            model(**inputs, use_cache=False).loss.backward()
        seen[len(targets)] = list(handed)
    # Backwards from the second layer's down to the first's o: a projection alone (o, down) hands its own on at once;
    # the first layer's q, k and v read the norm of the frozen embeddings, which asks for no gradient.
    alone, gate_up, qkv = [(1, True)], [(2, False), (2, True)], [(3, False), (3, False), (3, True)]
    assert seen[7] == alone + gate_up + alone + qkv + alone + gate_up + alone
    assert seen[4] == alone + alone + [(2, False), (2, True)] + alone + alone  # q and v share; k's is autograd's


@pytest.mark.parametrize("wrong", ["scale", "dropout"])
def test_a_wrong_scale_or_dropout_factor_is_caught(tiny_student, monkeypatch, wrong):
    """The comparison above is sharp enough to see a scale or dropout factor off by 1%."""
    model = lora_model(tiny_student, torch.float32, 0.3)
    peft_result = loss_and_gradients(model, fused_on=False)
    apply = fused.FusedLoraProduct.apply

    def off(x, weight, bias, lora_a, lora_b, scale, *rest):
        if wrong == "scale":
            scale *= 1.01
        else:
            x = x * 1.01  # as if dropout scaled its kept inputs by 1.01 / (1 - p)
        return apply(x, weight, bias, lora_a, lora_b, scale, *rest)

    monkeypatch.setattr(fused.FusedLoraProduct, "apply", off)
    assert error(loss_and_gradients(model, fused_on=True), peft_result) > 1e-4


def test_under_bf16_autocast_fused_lora_is_no_less_accurate_than_peft(tiny_student):
    reference = loss_and_gradients(lora_model(tiny_student, torch.float32, 0.0), fused_on=False)
    model = lora_model(tiny_student, torch.bfloat16, 0.0)  # bf16 base, fp32 adapters: as the stage trains
    peft_error = error(loss_and_gradients(model, fused_on=False, autocast=True), reference)
    fused_error = error(loss_and_gradients(model, fused_on=True, autocast=True), reference)
    print(f"relative error against fp32: peft {peft_error:.2e}, fused {fused_error:.2e}")
    assert 0 < peft_error < 0.1
    assert fused_error <= 1.2 * peft_error


def test_disabled_or_merged_adapters_and_the_end_of_the_block_fall_back_to_peft(tiny_student):
    model = lora_model(tiny_student, torch.float32, 0.0).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with fused.fused_lora(model):
            with model.disable_adapter():
                torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
            torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-6, atol=1e-6)
            model.merge_adapter()
            torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
            model.unmerge_adapter()
    assert not any("forward" in vars(module) for module in model.modules())  # peft's forward is back


def test_within_gradients_into_the_adapters_gradients_are_the_given_buffers(tiny_student):
    """What a CUDA graph's backward relies on to leave the gradients where the optimiser reads them, uncopied."""
    model = lora_model(tiny_student, torch.float32, 0.3)
    weights = [parameter for parameter in model.parameters() if parameter.requires_grad]
    tokenizer, batch = examples()
    inputs = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(batch)

    def gradients(into: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        buffers = [torch.full_like(weight, float("nan")) for weight in weights] if into else []
        torch.manual_seed(3)  # the same dropout draws
        with fused.fused_lora(model), fused.gradients_into(weights if into else [], buffers):
            loss = model(**inputs, use_cache=False).loss
            return torch.autograd.grad(loss, weights), buffers

    reference, _ = gradients(into=False)
    got, buffers = gradients(into=True)
    assert all(gradient is buffer for gradient, buffer in zip(got, buffers, strict=True))
    for gradient, expected in zip(got, reference, strict=True):
        torch.testing.assert_close(gradient, expected, rtol=1e-6, atol=1e-9)
    assert not fused._gradients_into  # only within the block


def test_within_casts_once_the_adapter_weights_are_read_from_their_copies(tiny_student):
    """What a CUDA graph that casts every adapter weight at its start relies on (train.cuda_graphs, casts_once)."""
    model = lora_model(tiny_student, torch.float32, 0.0)
    weights = [parameter for parameter in model.parameters() if parameter.requires_grad]
    with torch.no_grad():
        for weight in weights:
            weight.normal_(0, 0.05)  # B starts at zero: the adapters must change the loss
    tokenizer, batch = examples()
    inputs = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(batch)

    def loss(copies: list[torch.Tensor] | None) -> torch.Tensor:
        with fused.fused_lora(model), fused.casts_once(weights if copies else [], copies or []), torch.no_grad():
            return model(**inputs, use_cache=False).loss

    cast = loss(None)
    assert loss([weight.detach().clone() for weight in weights]) == cast
    without_adapters = loss([torch.zeros_like(weight) for weight in weights])
    with model.disable_adapter(), torch.no_grad():
        assert without_adapters == pytest.approx(model(**inputs, use_cache=False).loss.item(), rel=1e-6)
    assert abs(without_adapters - cast) > 1e-3
    assert not fused._casts  # only within the block
