"""The blog post's training recipe, as its notebook ran it, on today's APIs: the baseline for bench/train.py.

What it keeps from the post: 4-bit double-quant nf4 with bf16 compute; trl's old `setup_chat_format` (ChatML with
two added tokens, embeddings resized, pad = eos = <|im_end|>); LoRA r 256, alpha 128, dropout 0.05 on all
projections; 2 epochs of batch 4 x 2 accumulation; gradient checkpointing; adamw_8bit; lr 2e-4 with a constant
schedule; max_grad_norm 0.3; bf16 + tf32; loss over the whole conversation. flash_attention_2 becomes sdpa when
flash-attn is not installed.

    python bench/post_recipe.py --model DIR --data FILE --max-steps 20 --out result.json
"""

import argparse
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from redistill.io import read_records, write_json
from redistill.prompts import DEFAULT_SYSTEM_PROMPT

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def setup_chat_format(model, tokenizer):
    """trl < 0.20's `setup_chat_format`, which the post called: ChatML tokens added, embeddings resized."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.chat_template = CHATML
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="redistill's train.jsonl")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        device_map="auto",
        attn_implementation=args.attn,
        dtype=torch.bfloat16,
        quantization_config=bnb_config,
    )
    model, tokenizer = setup_chat_format(model, tokenizer)
    tokenizer.padding_side = "left"
    rows = [
        {
            "messages": [
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": row["text"]},
                {"role": "assistant", "content": "\n".join("|".join(triple) for triple in row["triples"])},
            ]
        }
        for row in read_records(args.data)
    ]
    peft_config = LoraConfig(
        lora_alpha=128,
        lora_dropout=0.05,
        r=256,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    config = SFTConfig(
        output_dir="post-recipe-checkpoints",
        num_train_epochs=2,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        activation_checkpointing=True,
        optim="adamw_8bit",
        logging_steps=10,
        save_strategy="no",
        learning_rate=2e-4,
        bf16=True,
        tf32=True,
        max_grad_norm=0.3,
        warmup_steps=0.03,
        lr_scheduler_type="constant",
        report_to="none",
        max_length=512,
        packing=False,
        include_num_input_tokens_seen="non_padding",
        dataset_kwargs={"add_special_tokens": False, "append_concat_token": False},
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        peft_config=peft_config,
        processing_class=tokenizer,
    )
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    steps, tokens = trainer.state.global_step, trainer.state.num_input_tokens_seen
    write_json(
        args.out,
        {
            "steps": steps,
            "tokens_seen": tokens,
            "runtime_seconds": seconds,
            "steps_per_second": steps / seconds,
            "tokens_per_second": tokens / seconds,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "final_loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1],
        },
    )


if __name__ == "__main__":
    main()
