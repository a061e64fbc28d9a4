"""Batched greedy generation, shared by evaluate and extract: left padding, KV cache, stop at end of turn."""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from redistill.prompts import prompt_ids, stop_token_ids


@dataclass(frozen=True)
class Generation:
    text: str
    ended: bool  # stopped at an end-of-turn token before max_new_tokens
    new_tokens: int


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    texts: list[str],
    system_prompt: str,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
) -> list[Generation]:
    """The model's answer to each sentence, greedy, in the order of ``texts``."""
    prompts = [prompt_ids(tokenizer, text, system_prompt) for text in texts]
    stops = stop_token_ids(tokenizer)
    # Batches of similar length waste less compute on padding; results go back to input order at the end.
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    results: list[Generation | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    with tqdm(total=len(prompts), desc=desc, unit="sentence") as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompts[index]) for index in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids = prompts[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            for row, index in enumerate(batch):
                new = output[row, width:].tolist()
                end = next((position for position, token in enumerate(new) if token in stops), None)
                kept = new if end is None else new[:end]
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                results[index] = Generation(text=text, ended=end is not None, new_tokens=len(kept))
            progress.update(len(batch))
    return results
