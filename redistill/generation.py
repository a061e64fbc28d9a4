"""Batched greedy generation, shared by evaluate and extract.

Every prompt starts with the same system turn, so its keys and values are computed once and copied into each
batch: only each sentence's own tokens are prefilled. Batches are cut from prompts sorted by length (little
padding, placed between the shared prefix and each sentence), decoding runs on the KV cache with greedy argmax,
and rows that reached an end-of-turn token leave the batch, so the rest decode at the width still working.

On a GPU, decoding is bound by the host launching ~1,000 small kernels a step, not by the GPU (profiled in
BENCHMARKS.md). There the batch keeps a fixed size and a static KV cache, and one decoding step is captured once as
a CUDA graph and replayed: one launch a step, and no cache growing by concatenation.
"""

import copy
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from redistill.prompts import prompt_ids, stop_token_ids

# Checking whether every row has finished makes the host wait for the GPU; doing it every few steps lets the
# host queue the next steps' kernels meanwhile. The same check drops finished rows from the batch.
SYNC_EVERY = 8


@dataclass(frozen=True)
class Generation:
    text: str
    ended: bool  # stopped at an end-of-turn token before max_new_tokens
    new_tokens: int


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    shortest = min(len(prompt) for prompt in prompts)
    first = prompts[0]
    length = 0
    while length < shortest - 1 and all(prompt[length] == first[length] for prompt in prompts):
        length += 1
    return length


def greedy_next(model, input_ids, mask, positions, cache) -> torch.Tensor:
    """One forward pass over the cache; the most likely next token of each row."""
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    return logits[:, -1].argmax(-1)


def left_padded(suffixes: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The suffixes as one tensor, right-aligned so every row's answer starts at the same column, and which
    positions hold tokens."""
    width = max(len(suffix) for suffix in suffixes)
    input_ids = torch.full((len(suffixes), width), pad, dtype=torch.long)
    filled = torch.zeros((len(suffixes), width), dtype=torch.bool)
    for row, suffix in enumerate(suffixes):
        input_ids[row, width - len(suffix) :] = torch.tensor(suffix)
        filled[row, width - len(suffix) :] = True
    return input_ids.to(device), filled.to(device)


def prompt_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts, sorted by length and cut into the fewest batches of at most ``batch_size``, all of
    nearly one size: 1,041 prompts at 512 make 3 batches of 347, not 512, 512 and 17 (a fixed-size batch would
    fill the 17 up to 512)."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    size = math.ceil(len(order) / math.ceil(len(order) / batch_size)) if order else batch_size
    return [order[start : start + size] for start in range(0, len(order), size)]


class Generator:
    """Greedy answers of one model to sentences under one system prompt; the prompt's cache is built once."""

    def __init__(
        self, model, tokenizer, system_prompt: str, max_new_tokens: int, batch_size: int, static: bool | None = None
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_new_tokens, self.batch_size = system_prompt, max_new_tokens, batch_size
        self.stops = stop_token_ids(tokenizer)
        self.device = next(model.parameters()).device
        # Static batches take a 4D mask, which flash-attention does not; on the CPU there is no launch cost to save.
        masks = getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        self.static = (self.device.type == "cuda" and masks) if static is None else static
        self._prefix: list[int] | None = None
        self._prefix_cache = None
        self._state: StaticState | None = None
        self._batch_rows = batch_size  # the rows of this call's batches; a static batch is filled up to it

    def prompt_ids(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text, self.system_prompt)

    @torch.inference_mode()
    def generate(self, texts: list[str], desc: str = "generate", progress: bool = True) -> list[Generation]:
        """The model's answer to each sentence, in the order of ``texts``."""
        prompts = [self.prompt_ids(text) for text in texts]
        results: list[Generation | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="sentence", disable=not progress) as bar:
            batches = prompt_batches([len(prompt) for prompt in prompts], self.batch_size)
            self._batch_rows = max((len(batch) for batch in batches), default=self.batch_size)
            for batch in batches:
                for index, generation in zip(batch, self._generate_batch([prompts[i] for i in batch]), strict=True):
                    results[index] = generation
                bar.update(len(batch))
        return results

    def _prefix_for(self, prompts: list[list[int]]) -> tuple[int, object]:
        """The cached shared prefix, rebuilt only when these prompts do not all start with it."""
        if self._prefix is None or not all(
            len(prompt) > len(self._prefix) and prompt[: len(self._prefix)] == self._prefix for prompt in prompts
        ):
            from transformers import DynamicCache

            self._prefix = prompts[0][: shared_prefix_length(prompts)]
            self._prefix_cache = DynamicCache(config=self.model.config)
            if self._prefix:
                ids = torch.tensor([self._prefix], device=self.device)
                self.model(input_ids=ids, past_key_values=self._prefix_cache, use_cache=True, logits_to_keep=1)
        return len(self._prefix), self._prefix_cache

    def _generate_batch(self, prompts: list[list[int]]) -> list[Generation]:
        if self.static:
            return self._generate_static_batch(prompts)
        prefix_length, prefix_cache = self._prefix_for(prompts)
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(prompts))
        pad = self.tokenizer.pad_token_id
        # padding between the shared prefix and each sentence's tokens
        input_ids, filled = left_padded([prompt[prefix_length:] for prompt in prompts], pad, self.device)
        suffix_mask = filled.long()
        prefix_mask = torch.ones((len(prompts), prefix_length), dtype=torch.long, device=self.device)
        mask = torch.cat([prefix_mask, suffix_mask], 1)
        positions = (prefix_length + suffix_mask.cumsum(-1) - 1).clamp(min=prefix_length)
        stops = torch.tensor(self.stops, device=self.device)

        rows = torch.arange(len(prompts), device=self.device)  # which prompt each batch row still answers
        tokens = torch.full((len(prompts), self.max_new_tokens), pad, dtype=torch.long, device=self.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        for step in range(self.max_new_tokens):
            next_tokens = greedy_next(self.model, input_ids, mask, positions, cache)
            tokens[rows, step] = torch.where(finished, pad, next_tokens)
            finished |= torch.isin(next_tokens, stops)
            if (step + 1) % SYNC_EVERY == 0 and step + 1 < self.max_new_tokens:
                alive = (~finished).nonzero().squeeze(-1)
                if len(alive) == 0:
                    break
                if len(alive) < len(rows):
                    cache.batch_select_indices(alive)
                    rows, finished, next_tokens, mask = rows[alive], finished[alive], next_tokens[alive], mask[alive]
                    positions = positions[alive]
            input_ids = next_tokens[:, None]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=self.device)], 1)
        return [self._decode(answer) for answer in tokens.tolist()]

    def _generate_static_batch(self, prompts: list[list[int]]) -> list[Generation]:
        """Decoding at a fixed batch size over a static cache (short batches are filled up with their last prompt),
        one step replayed as a CUDA graph on a GPU. Every key position has a mask entry: 0 where a row may look,
        the dtype's minimum elsewhere."""
        count, pad = len(prompts), self.tokenizer.pad_token_id
        prompts = prompts + [prompts[-1]] * (self._batch_rows - count)
        prefix_length, prefix_cache = self._prefix_for(prompts)
        input_ids, suffix_mask = left_padded([prompt[prefix_length:] for prompt in prompts], pad, self.device)
        width = input_ids.shape[1]
        state = self._static_state(prefix_length + width + self.max_new_tokens)
        blocked = torch.finfo(state.mask.dtype).min
        for layer, prefix_layer in zip(state.cache.layers, prefix_cache.layers, strict=True):
            if prefix_length:
                layer.keys[:, :, :prefix_length] = prefix_layer.keys
                layer.values[:, :, :prefix_length] = prefix_layer.values
            layer.cumulative_length.fill_(prefix_length)
        state.mask.fill_(blocked)
        state.mask[:, 0, 0, :prefix_length] = 0
        state.mask[:, 0, 0, prefix_length : prefix_length + width].masked_fill_(suffix_mask, 0)
        positions = (prefix_length + suffix_mask.long().cumsum(-1) - 1).clamp(min=prefix_length)
        keys = torch.arange(state.mask.shape[-1], device=self.device)
        queries = torch.arange(prefix_length, prefix_length + width, device=self.device)
        causal = torch.where(keys[None, :] <= queries[:, None], 0.0, blocked).to(state.mask.dtype)
        prefill_mask = torch.maximum(state.mask + causal, torch.tensor(blocked, device=self.device))
        prefill_mask[:, :, torch.arange(width), queries] = 0  # every query sees itself: no row of only blocked keys
        next_tokens = greedy_next(self.model, input_ids, prefill_mask, positions, state.cache)
        state.positions.copy_(positions[:, -1:])
        stops = torch.tensor(self.stops, device=self.device)
        tokens = torch.full((len(prompts), self.max_new_tokens), pad, device=self.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        for step in range(self.max_new_tokens):
            tokens[:, step] = torch.where(finished, pad, next_tokens)
            finished |= torch.isin(next_tokens, stops)
            if step + 1 == self.max_new_tokens or ((step + 1) % SYNC_EVERY == 0 and bool(finished[:count].all())):
                break
            state.input_ids.copy_(next_tokens[:, None])
            state.positions.add_(1)
            state.mask[:, 0, 0, prefix_length + width + step] = 0
            next_tokens = state.step().clone()
        return [self._decode(answer) for answer in tokens[:count].tolist()]

    def _static_state(self, length: int) -> "StaticState":
        if self._state is None or self._state.mask.shape[-1] < length or len(self._state.mask) != self._batch_rows:
            self._state = None  # the old cache and graph go before the new ones are allocated
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._state = StaticState.build(self.model, self._batch_rows, length, self.device)
        return self._state

    def _decode(self, new: list[int]) -> Generation:
        end = next((position for position, token in enumerate(new) if token in self.stops), None)
        kept = new if end is None else new[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Generation(text=text, ended=end is not None, new_tokens=len(kept))


@dataclass
class StaticState:
    """A static cache for one batch size and length, the step's inputs at fixed addresses, and the step itself:
    a CUDA graph's replay on a GPU, a plain forward elsewhere."""

    model: object
    cache: object
    input_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    graph: object = None
    next_tokens: torch.Tensor | None = None

    @classmethod
    @torch.inference_mode()
    def build(cls, model, batch_size: int, length: int, device) -> "StaticState":
        from transformers import StaticCache

        dtype = next(model.parameters()).dtype
        state = cls(
            model=model,
            cache=StaticCache(config=model.config, max_cache_len=length),
            input_ids=torch.zeros((batch_size, 1), dtype=torch.long, device=device),
            positions=torch.zeros((batch_size, 1), dtype=torch.long, device=device),
            mask=torch.zeros((batch_size, 1, 1, length), dtype=dtype, device=device),
        )
        state.forward()  # allocates the cache; later batches reset where each layer writes
        if device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs need
                state.forward()
            torch.cuda.current_stream().wait_stream(stream)
            state.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state.graph):
                state.next_tokens = state.forward()
        return state

    def forward(self) -> torch.Tensor:
        return greedy_next(self.model, self.input_ids, self.mask, self.positions, self.cache)

    def step(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.next_tokens


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
    return Generator(model, tokenizer, system_prompt, max_new_tokens, batch_size).generate(texts, desc)
