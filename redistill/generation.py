"""Batched greedy generation: evaluate and extract both answer sentences through `Generator.generate`.

Every prompt starts with the same system turn, so its keys and values are computed once and copied into each
batch: only each sentence's own tokens are prefilled. Batches are cut from prompts sorted by length (little
padding, placed between the shared prefix and each sentence), and one loop decodes every batch: it picks each
row's next token from the model's logits (greedy argmax today), records it, and every few steps stops once all
rows have said an end-of-turn token.

The loop runs over one of two KV caches, which differ only in how a step's inputs reach the model:
- `GrowingCache` (the CPU's): the cache and attention mask grow by concatenation, and rows that finished leave the
  batch, so the rest decode at the width still working.
- `StaticGraphCache` (a GPU's): on a GPU, decoding is bound by the host launching ~1,000 small kernels a step, not
  by the GPU (profiled in BENCHMARKS.md). There the batch keeps a fixed size and a static KV cache at fixed
  addresses, and one decoding step is captured once as a CUDA graph and replayed: one launch a step, and no cache
  growing by concatenation. Finished rows stay (a graph's tensors cannot shrink); their tokens are not recorded.
"""

import copy
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm import tqdm

from redistill.prompts import prompt_ids, stop_token_ids

# Checking whether every row has finished makes the host wait for the GPU; doing it every few steps lets the
# host queue the next steps' kernels meanwhile. The same check drops finished rows from a growing cache.
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


def last_logits(model, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One forward pass over the cache; the logits of each row's next token."""
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    return logits[:, -1]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely next token of each row."""
    return logits.argmax(-1)


def left_padded(suffixes: list[list[int]], pad: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass(frozen=True)
class Prefill:
    """The inputs of a batch's first forward pass: the shared prefix's cache, and each row's own tokens after it."""

    prefix_length: int
    prefix_cache: object  # a DynamicCache of one row
    input_ids: torch.Tensor  # the suffixes, left-padded
    filled: torch.Tensor  # which columns of input_ids hold tokens
    positions: torch.Tensor


class DecodingCache(Protocol):
    """What the decoding loop asks of a KV cache. Each call returns the logits of every row's next token; the
    logits stay valid until the next call."""

    def prefill(self, inputs: Prefill) -> torch.Tensor: ...

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor: ...

    def drop(self, alive: torch.Tensor) -> bool:
        """Keep only the rows ``alive``; False where the batch keeps its size (the loop then keeps every row)."""
        ...


class GrowingCache:
    """A dynamic cache whose attention mask grows by one column a step, and from which finished rows leave."""

    def __init__(self, model) -> None:
        self.model = model

    def prefill(self, inputs: Prefill) -> torch.Tensor:
        rows, device = len(inputs.input_ids), inputs.input_ids.device
        self.cache = copy.deepcopy(inputs.prefix_cache)
        self.cache.batch_repeat_interleave(rows)
        prefix_mask = torch.ones((rows, inputs.prefix_length), dtype=torch.long, device=device)
        self.mask = torch.cat([prefix_mask, inputs.filled.long()], 1)
        self.positions = inputs.positions
        return last_logits(self.model, inputs.input_ids, self.mask, self.positions, self.cache)

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        self.positions = self.positions[:, -1:] + 1
        ones = torch.ones((len(next_tokens), 1), dtype=torch.long, device=next_tokens.device)
        self.mask = torch.cat([self.mask, ones], 1)
        return last_logits(self.model, next_tokens[:, None], self.mask, self.positions, self.cache)

    def drop(self, alive: torch.Tensor) -> bool:
        self.cache.batch_select_indices(alive)
        self.mask, self.positions = self.mask[alive], self.positions[alive]
        return True


@dataclass
class StaticGraphCache:
    """A static cache for one batch size and length, the step's inputs at fixed addresses, and the step itself:
    a CUDA graph's replay on a GPU, a plain forward elsewhere. Every key position has a mask entry: 0 where a row
    may look, the dtype's minimum elsewhere. Built once and reused by every batch that fits it."""

    model: object
    cache: object
    input_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    graph: object = None
    logits: torch.Tensor | None = None  # the graph's output
    column: int = 0  # the key position the next step writes

    @classmethod
    @torch.inference_mode()
    def build(cls, model, batch_size: int, length: int, device: torch.device) -> "StaticGraphCache":
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
                state.logits = state.forward()
        return state

    def fits(self, batch_size: int, length: int) -> bool:
        return len(self.mask) == batch_size and self.mask.shape[-1] >= length

    def forward(self) -> torch.Tensor:
        return last_logits(self.model, self.input_ids, self.mask, self.positions, self.cache)

    def prefill(self, inputs: Prefill) -> torch.Tensor:
        """The prefix copied into every row, then the suffixes' forward under a causal 4D mask of its own."""
        prefix_length, width, device = inputs.prefix_length, inputs.input_ids.shape[1], inputs.input_ids.device
        blocked = torch.finfo(self.mask.dtype).min
        for layer, prefix_layer in zip(self.cache.layers, inputs.prefix_cache.layers, strict=True):
            if prefix_length:
                layer.keys[:, :, :prefix_length] = prefix_layer.keys
                layer.values[:, :, :prefix_length] = prefix_layer.values
            layer.cumulative_length.fill_(prefix_length)
        self.mask.fill_(blocked)
        self.mask[:, 0, 0, :prefix_length] = 0
        self.mask[:, 0, 0, prefix_length : prefix_length + width].masked_fill_(inputs.filled, 0)
        keys = torch.arange(self.mask.shape[-1], device=device)
        queries = torch.arange(prefix_length, prefix_length + width, device=device)
        causal = torch.where(keys[None, :] <= queries[:, None], 0.0, blocked).to(self.mask.dtype)
        prefill_mask = torch.maximum(self.mask + causal, torch.tensor(blocked, device=device))
        prefill_mask[:, :, torch.arange(width), queries] = 0  # every query sees itself: no row of only blocked keys
        logits = last_logits(self.model, inputs.input_ids, prefill_mask, inputs.positions, self.cache)
        self.positions.copy_(inputs.positions[:, -1:])
        self.column = prefix_length + width
        return logits

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(next_tokens[:, None])
        self.positions.add_(1)
        self.mask[:, 0, 0, self.column] = 0
        self.column += 1
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits

    def drop(self, alive: torch.Tensor) -> bool:
        return False  # fixed addresses: finished rows keep decoding, unrecorded


class Generator:
    """Greedy answers of one model to sentences under one system prompt; the prompt's cache is built once.

    ``static`` forces the cache kind (True: static cache and, on a GPU, CUDA graphs; False: the growing cache);
    None chooses the static one on a GPU whose attention takes a 4D mask."""

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: str,
        max_new_tokens: int,
        batch_size: int,
        *,
        static: bool | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_new_tokens, self.batch_size = system_prompt, max_new_tokens, batch_size
        self.stops = stop_token_ids(tokenizer)
        self.device = next(model.parameters()).device
        # Static batches take a 4D mask, which flash-attention does not; on the CPU there is no launch cost to save.
        masks = getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        self.static = (self.device.type == "cuda" and masks) if static is None else static
        self._prefix: list[int] | None = None
        self._prefix_cache = None
        self._static_cache: StaticGraphCache | None = None

    def prompt_ids(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text, self.system_prompt)

    @torch.inference_mode()
    def generate(self, texts: list[str], desc: str = "generate", progress: bool = True) -> list[Generation]:
        """The model's answer to each sentence, in the order of ``texts``."""
        prompts = [self.prompt_ids(text) for text in texts]
        results: list[Generation | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="sentence", disable=not progress) as bar:
            batches = prompt_batches([len(prompt) for prompt in prompts], self.batch_size)
            batch_rows = max((len(batch) for batch in batches), default=self.batch_size)  # a static batch's size
            for batch in batches:
                answers = self._generate_batch([prompts[i] for i in batch], batch_rows)
                for index, generation in zip(batch, answers, strict=True):
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

    def _prefill_inputs(self, prompts: list[list[int]], rows: int) -> Prefill:
        """The first forward's inputs for ``rows`` rows: a short batch is filled up with its last prompt, whose
        answers are decoded but never kept."""
        prefix_length, prefix_cache = self._prefix_for(prompts)
        suffixes = [prompt[prefix_length:] for prompt in prompts + [prompts[-1]] * (rows - len(prompts))]
        # padding between the shared prefix and each sentence's tokens
        input_ids, filled = left_padded(suffixes, self.tokenizer.pad_token_id, self.device)
        positions = (prefix_length + filled.long().cumsum(-1) - 1).clamp(min=prefix_length)
        return Prefill(prefix_length, prefix_cache, input_ids, filled, positions)

    def _cache(self, rows: int, length: int) -> DecodingCache:
        if not self.static:
            return GrowingCache(self.model)
        if self._static_cache is None or not self._static_cache.fits(rows, length):
            self._static_cache = None  # the old cache and graph go before the new ones are allocated
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._static_cache = StaticGraphCache.build(self.model, rows, length, self.device)
        return self._static_cache

    def _generate_batch(self, prompts: list[list[int]], batch_rows: int) -> list[Generation]:
        """The answers to one batch: the decoding loop. ``batch_rows`` is the size of a static batch."""
        count, pad = len(prompts), self.tokenizer.pad_token_id
        rows = batch_rows if self.static else count
        inputs = self._prefill_inputs(prompts, rows)
        cache = self._cache(rows, inputs.prefix_length + inputs.input_ids.shape[1] + self.max_new_tokens)
        logits = cache.prefill(inputs)
        stops = torch.tensor(self.stops, device=self.device)
        answering = torch.arange(rows, device=self.device)  # which batch row each cache row still answers
        tokens = torch.full((rows, self.max_new_tokens), pad, dtype=torch.long, device=self.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=self.device)
        finished[count:] = True  # the filler rows of a static batch
        for step in range(self.max_new_tokens):
            # Where a sampler or logits processor (beam search, constrained decoding) would choose instead.
            next_tokens = greedy(logits)
            tokens[answering, step] = torch.where(finished, pad, next_tokens)
            finished |= torch.isin(next_tokens, stops)
            if step + 1 == self.max_new_tokens:
                break
            if (step + 1) % SYNC_EVERY == 0:
                alive = (~finished).nonzero().squeeze(-1)
                if len(alive) == 0:
                    break
                if len(alive) < len(answering) and cache.drop(alive):
                    answering, finished, next_tokens = answering[alive], finished[alive], next_tokens[alive]
            logits = cache.step(next_tokens)
        return [self._decode(answer) for answer in tokens[:count].tolist()]

    def _decode(self, new: list[int]) -> Generation:
        end = next((position for position, token in enumerate(new) if token in self.stops), None)
        kept = new if end is None else new[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Generation(text=text, ended=end is not None, new_tokens=len(kept))
