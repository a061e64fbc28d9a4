"""train.liger_kernels: on a GPU, Liger's kernels in a LoRA-wrapped model give the model's own loss and gradients;
the fast preset's Liger gives way where it can't run; decoding with them where they can't run is one line. (On a
CPU the training setting is refused: tests/test_training.py.)"""

import importlib.util

import pytest
import torch
from test_extract import extract
from test_training import tiny_train_params
from transformers.models.llama import modeling_llama

from redistill.params import ParamError

needs_liger = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="needs a CUDA GPU and liger-kernel",
)


@needs_liger
def test_liger_kernels_give_the_models_loss_and_gradients_on_the_gpu(tiny_student, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations.liger import apply_liger_kernel

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger swaps these module-wide: undone after
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    torch.manual_seed(0)
    input_ids = torch.randint(0, 200, (2, 48), device="cuda")

    def loss_and_gradients(liger: bool) -> tuple[float, list[torch.Tensor]]:
        model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.bfloat16).cuda()
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(model, lora).train()
        for parameter in model.parameters():  # the same adapter in both models: B away from zero, so A has a gradient
            if parameter.requires_grad:
                torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator("cuda").manual_seed(1))
        if liger:
            apply_liger_kernel(model, {"cross_entropy": False, "fused_linear_cross_entropy": False})
            assert model.get_base_model().model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]

    eager_loss, eager_gradients = loss_and_gradients(liger=False)
    loss, gradients = loss_and_gradients(liger=True)
    assert loss == pytest.approx(eager_loss, rel=1e-2)
    for gradient, eager_gradient in zip(gradients, eager_gradients, strict=True):
        torch.testing.assert_close(gradient, eager_gradient, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize(("cuda", "installed", "compiled", "on"), [
    (True, True, False, True),
    (False, True, False, False),  # no GPU (a CPU run, as here)
    (True, False, False, False),  # the package missing (requirements-gpu.txt not installed)
    (True, True, True, False),  # train.compile: dynamo can't trace Liger's norm
])  # fmt: skip
def test_the_fast_presets_liger_gives_way_where_it_cannot_run(monkeypatch, cuda, installed, compiled, on):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if installed else None)
    params = tiny_train_params(preset="fast", liger_kernels=None, compile=compiled)
    assert params.liger_kernels is on
    params.validate()  # the preset's choice is never refused
    assert tiny_train_params(preset="post", liger_kernels=None).liger_kernels is False


def test_liger_kernels_set_by_hand_are_refused_with_train_compile():
    with pytest.raises(ParamError, match=r"train\.liger_kernels can't be compiled"):
        tiny_train_params(liger_kernels=True, compile=True).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs Liger's kernels")
def test_decoding_with_liger_kernels_where_they_cant_run_is_one_line(tmp_path, tiny_adapter, capsys):
    from redistill.evaluation import EvalParams
    from redistill.params import load_block, read_params_file

    params = read_params_file()
    params["evaluate"]["liger_kernels"] = True
    with pytest.raises(ParamError) as error:
        load_block(EvalParams, "evaluate", params)
    line = "evaluate.liger_kernels needs a CUDA GPU (Liger's kernels are Triton's); leave it off here"
    assert str(error.value) == f"params.yaml: {line}"
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("Alice is from France.\n")
    assert extract(str(source), "--model", str(tiny_adapter), "-o", str(out), "--liger-kernels") == 1
    assert capsys.readouterr().err.strip() == "error: " + line.replace("evaluate.liger_kernels", "--liger-kernels")
    assert not out.exists()
