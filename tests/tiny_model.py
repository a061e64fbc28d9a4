"""A tiny random Llama with its own small tokenizer and chat template, built in seconds without any download."""

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "You are an experienced annotator. Extract all entities and the relations between them from the following text.",
    "Write the answer as a triple entity1|relationship|entity2. Do not add anything else.",
    "Example Text: Alice is from France. Answer: Alice|is from|France.",
    "Marie Curie was born in Warsaw in 1867 and won two Nobel Prizes.",
    "The U.S. Army was founded in 1775 by the Continental Congress.",
    "system user assistant",
] * 20


def build_tokenizer(chat_template: str | None = CHATML, eos: str = "<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "</s>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    # No pad token, as many real tokenizers: the pipeline must cope with pad = eos.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, additional_special_tokens=specials)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(
    folder: Path, chat_template: str | None = CHATML, eos: str = "<|im_end|>", hidden_size: int = 32
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template, eos)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
