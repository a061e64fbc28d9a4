"""The instruction, the chat messages built around one sentence, and their tokens for training and generation."""

from redistill.errors import PipelineError

# The post's prompt with its typos fixed ("annontator", "entitity2"); its example is kept.
DEFAULT_SYSTEM_PROMPT = (
    "You are an experienced annotator. Extract all entities and the relations between them from the following "
    "text. Write the answer as a triple entity1|relationship|entity2. Do not add anything else.\n"
    "Example Text: Alice is from France.\n"
    "Answer: Alice|is from|France."
)

# The fallback for tokenizers without a chat template: ChatML's layout, as the post's `setup_chat_format`. Unlike
# it, no new tokens are added (LoRA could not train their embeddings): each turn is closed by the tokenizer's own
# EOS token, which the model already knows and learns to emit after its answer.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEMPLATE_FALLBACKS = {"chatml": CHATML_TEMPLATE}


def teacher_prompt(params: dict) -> str:
    """``teacher.system_prompt`` of a params.yaml mapping, or the default: for stages that use the teacher's
    instruction but not the teacher (train), so that teacher code is not among their dependencies."""
    prompt = (params.get("teacher") or {}).get("system_prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise PipelineError(f"params.yaml: teacher.system_prompt must be a string or null, got {prompt!r}")
    return prompt or DEFAULT_SYSTEM_PROMPT


def chat_messages(text: str, system_prompt: str) -> list[dict]:
    """The system prompt, then the sentence as the user's turn (as the post asked the teacher)."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]


def answer_text(triples: list[list[str]]) -> str:
    """The training target: one ``head|relation|tail`` per line."""
    return "\n".join("|".join(triple) for triple in triples)


def ensure_chat_template(tokenizer, fallback: str | None, model_name: str) -> None:
    """Keep the tokenizer's own chat template; give it the named fallback if it has none."""
    if tokenizer.chat_template:
        return
    if fallback is None:
        raise PipelineError(
            f"{model_name} has no chat template; set student.chat_template_fallback: chatml to use ChatML"
        )
    tokenizer.chat_template = CHAT_TEMPLATE_FALLBACKS[fallback]


def prompt_ids(tokenizer, text: str, system_prompt: str) -> list[int]:
    """Tokens of the conversation up to where the assistant starts its answer."""
    rendered = tokenizer.apply_chat_template(
        chat_messages(text, system_prompt), tokenize=False, add_generation_prompt=True
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: EOS, and the template's end-of-turn token where it is a different one."""
    ids = [tokenizer.eos_token_id]
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token in tokenizer.all_special_tokens and token_id not in ids:
            ids.append(token_id)
    return ids


def training_example(tokenizer, text: str, triples: list[list[str]], system_prompt: str) -> dict:
    """``input_ids`` and ``labels`` of one conversation: the prompt is masked (-100); the answer and the
    end-of-turn token that closes it are labelled, so the model learns to stop. What the template adds after
    that token (a newline) is cut."""
    prompt = prompt_ids(tokenizer, text, system_prompt)
    messages = [*chat_messages(text, system_prompt), {"role": "assistant", "content": answer_text(triples)}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise PipelineError("the chat template renders the prompt differently inside a full conversation")
    answer = full[len(prompt) :]
    stops = stop_token_ids(tokenizer)
    ends = [index for index, token in enumerate(answer) if token in stops]
    answer = answer[: ends[-1] + 1] if ends else [*answer, tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
