"""Batched generation: evaluate and extract both answer sentences through `Generator.generate`.

Every prompt starts with the same system turn, so its keys and values are computed once and copied into each
batch: only each sentence's own tokens are prefilled. Batches are cut from prompts sorted by length (little
padding, placed between the shared prefix and each sentence), and one loop decodes every batch: it picks each
row's next token from the model's logits, records it, and every few steps stops once all rows have said an
end-of-turn token.

How the next token is picked is a `Decoding` (redistill/decoding.py; the defaults are greedy): a `RowSearch`
takes the likeliest token of each row or samples it (self-consistency: each sentence decoded as several rows,
whose answers vote), a `BeamSearch` keeps the likeliest beams of each sentence and reorders the cache's rows
after them; `structured` puts a `TripleGrammar` under either (redistill/structured.py): it masks the tokens that
would break a `head|relation|tail` line before the choice.

The loop runs over one of two KV caches, which differ only in how a step's inputs reach the model:
- `GrowingCache` (the CPU's): the cache and attention mask grow by concatenation, and rows that finished leave the
  batch, so the rest decode at the width still working.
- `StaticGraphCache` (a GPU's): on a GPU, decoding is bound by the host launching ~1,000 small kernels a step, not
  by the GPU (profiled in BENCHMARKS.md). There the batch keeps a fixed size and a static KV cache at fixed
  addresses, and one decoding step is captured once as a CUDA graph and replayed: one launch a step, and no cache
  growing by concatenation. Finished rows stay (a graph's tensors cannot shrink); their tokens are not recorded.
  The graph returns the logits: the token is chosen outside it, and beam search's reordering copies rows within
  the fixed buffers.

With `continuous` batching (`_generate_continuous`, over the static cache), all the sentences share one batch, and
rows that finished take the next waiting sentences instead of decoding unrecorded to the end of their batch.
"""

import copy
import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from redistill.decoding import GREEDY, Decoding, distinct_triples, triples_text, vote
from redistill.live_attention import attending_to_live_columns
from redistill.prompts import prompt_ids, stop_token_ids
from redistill.structured import GrammarState, TripleGrammar

# Checking whether every row has finished makes the host wait for the GPU; doing it every few steps lets the
# host queue the next steps' kernels meanwhile. The same check drops finished rows from a growing cache.
SYNC_EVERY = 8
# Rows prefilled together when continuous batching gives rows new sentences: enough tokens for efficient matrix
# products, few enough that their cache apart (every layer, the prefix copied in) stays a few GiB on an 8B model.
ADMIT_ROWS = 256
# The attention kernels a continuous batch's admitted rows are prefilled with. Left free, PyTorch takes cuDNN's for
# masked half-precision attention on recent GPUs, which builds a plan on the host for every new shape, and admitted
# chunks come in ever new shapes (rows x width); these kernels need no plan.
ADMIT_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class Generation:
    text: str
    ended: bool  # stopped at an end-of-turn token before max_new_tokens (samples: most of them did)
    new_tokens: int  # the answer's tokens (samples: the total of the samples', the tokens decoded for it)


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    shortest = min(len(prompt) for prompt in prompts)
    first = prompts[0]
    length = 0
    while length < shortest - 1 and all(prompt[length] == first[length] for prompt in prompts):
        length += 1
    return length


def last_logits(
    model, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, **attention
) -> torch.Tensor:
    """One forward pass over the cache; the logits of each row's next token. ``attention``: keywords for the
    attention function (live-column attention's ``live_starts`` and ``live_bounds``)."""
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **attention,
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
    repeat: int = 1  # rows of the batch that decode each suffix (its samples or beams), one after the other

    def repeated(self) -> "Prefill":
        """The same inputs with each row repeated ``repeat`` times."""
        if self.repeat == 1:
            return self
        rows = {name: getattr(self, name).repeat_interleave(self.repeat, 0) for name in ("input_ids", "filled")}
        return replace(self, **rows, positions=self.positions.repeat_interleave(self.repeat, 0), repeat=1)


class DecodingCache(Protocol):
    """What the decoding loop asks of a KV cache. Each call returns the logits of every row's next token; the
    logits stay valid until the next call."""

    def prefill(self, inputs: Prefill) -> torch.Tensor: ...

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor: ...

    def drop(self, alive: torch.Tensor) -> bool:
        """Keep only the rows ``alive``; False where the batch keeps its size (the loop then keeps every row)."""
        ...

    def reorder(self, source: torch.Tensor) -> None:
        """Row ``i`` goes on from what row ``source[i]`` has seen so far (beam search)."""
        ...


class GrowingCache:
    """A dynamic cache whose attention mask grows by one column a step, and from which finished rows leave."""

    def __init__(self, model) -> None:
        self.model = model

    def prefill(self, inputs: Prefill) -> torch.Tensor:
        """Each suffix's forward once; its samples or beams then copy its cache rows."""
        rows, device = len(inputs.input_ids), inputs.input_ids.device
        self.cache = copy.deepcopy(inputs.prefix_cache)
        self.cache.batch_repeat_interleave(rows)
        prefix_mask = torch.ones((rows, inputs.prefix_length), dtype=torch.long, device=device)
        self.mask = torch.cat([prefix_mask, inputs.filled.long()], 1)
        self.positions = inputs.positions
        logits = last_logits(self.model, inputs.input_ids, self.mask, self.positions, self.cache)
        if inputs.repeat == 1:
            return logits
        self.cache.batch_repeat_interleave(inputs.repeat)
        self.mask = self.mask.repeat_interleave(inputs.repeat, 0)
        self.positions = self.positions.repeat_interleave(inputs.repeat, 0)
        return logits.repeat_interleave(inputs.repeat, 0)

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        self.positions = self.positions[:, -1:] + 1
        ones = torch.ones((len(next_tokens), 1), dtype=torch.long, device=next_tokens.device)
        self.mask = torch.cat([self.mask, ones], 1)
        return last_logits(self.model, next_tokens[:, None], self.mask, self.positions, self.cache)

    def drop(self, alive: torch.Tensor) -> bool:
        self.cache.batch_select_indices(alive)
        self.mask, self.positions = self.mask[alive], self.positions[alive]
        return True

    def reorder(self, source: torch.Tensor) -> None:
        self.cache.reorder_cache(source)
        self.mask, self.positions = self.mask[source], self.positions[source]


@dataclass
class StaticGraphCache:
    """A static cache for one batch size and length, the step's inputs at fixed addresses, and the step itself:
    a CUDA graph's replay on a GPU, a plain forward elsewhere. Every key position has a mask entry: 0 where a row
    may look, the dtype's minimum elsewhere. Built once and reused by every batch that fits it.

    With ``live_columns``, the step reads only each row's prefix and own columns (redistill/live_attention.py):
    ``starts`` holds each row's first own column, ``bounds`` the prefix's length and the column after the step's."""

    model: object
    cache: object
    input_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    graph: object = None
    logits: torch.Tensor | None = None  # the graph's output
    column: int = 0  # the key position the next step writes
    prefix_length: int = 0
    live_columns: bool = False
    starts: torch.Tensor | None = None
    bounds: torch.Tensor | None = None

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        model,
        batch_size: int,
        length: int,
        device: torch.device,
        live_columns: bool = False,
    ) -> "StaticGraphCache":
        from transformers import StaticCache

        dtype = next(model.parameters()).dtype
        state = cls(
            model=model,
            cache=StaticCache(config=model.config, max_cache_len=length),
            input_ids=torch.zeros((batch_size, 1), dtype=torch.long, device=device),
            positions=torch.zeros((batch_size, 1), dtype=torch.long, device=device),
            mask=torch.zeros((batch_size, 1, 1, length), dtype=dtype, device=device),
            live_columns=live_columns,
            starts=torch.zeros(batch_size, dtype=torch.int32, device=device),
            bounds=torch.tensor([0, length], dtype=torch.int32, device=device),
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

    def fits(self, batch_size: int, length: int, live_columns: bool = False) -> bool:
        return len(self.mask) == batch_size and self.mask.shape[-1] >= length and self.live_columns == live_columns

    def forward(self) -> torch.Tensor:
        """The step (captured as the graph on a GPU)."""
        if self.live_columns:
            with attending_to_live_columns(self.model):
                return last_logits(
                    self.model,
                    self.input_ids,
                    self.mask,
                    self.positions,
                    self.cache,
                    live_starts=self.starts,
                    live_bounds=self.bounds,
                )
        return last_logits(self.model, self.input_ids, self.mask, self.positions, self.cache)

    @property
    def blocked(self) -> float:
        return torch.finfo(self.mask.dtype).min

    def _write_prefix(self, prefix_length: int, prefix_cache) -> None:
        """The prefix copied into every row's first columns, the only ones the rows may look at so far; the next
        write goes after it."""
        for layer, prefix_layer in zip(self.cache.layers, prefix_cache.layers, strict=True):
            if prefix_length:
                layer.keys[:, :, :prefix_length] = prefix_layer.keys
                layer.values[:, :, :prefix_length] = prefix_layer.values
            layer.cumulative_length.fill_(prefix_length)
        self.mask.fill_(self.blocked)
        self.mask[:, 0, 0, :prefix_length] = 0
        self.starts.fill_(prefix_length)
        self.bounds[0] = prefix_length
        self.prefix_length = self.column = prefix_length

    def prefill(self, inputs: Prefill) -> torch.Tensor:
        """The prefix copied into every row, then the suffixes' forward under a causal 4D mask of its own (each
        row's own: the rows of one suffix's samples or beams are prefilled each, the batch's size is fixed)."""
        inputs = inputs.repeated()
        prefix_length, width, device = inputs.prefix_length, inputs.input_ids.shape[1], inputs.input_ids.device
        blocked = self.blocked
        self._write_prefix(prefix_length, inputs.prefix_cache)
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

    def start(self, prefix_length: int, prefix_cache) -> None:
        """Continuous batching: only the prefix is in place; rows get their sentences through `admit`. The columns
        after the prefix are a ring: the step's column goes round them, each row's sentence and answer taking the
        columns just before it (the cache's length leaves room for the longest sentence and answer)."""
        self._write_prefix(prefix_length, prefix_cache)

    def admit(self, rows: torch.Tensor, inputs: Prefill) -> torch.Tensor:
        """Rows take new sentences, and these rows' logits come back: the suffixes are prefilled apart over the
        prefix (as a growing cache prefills them: each row computes only its chunk's width, not the batch's), their
        keys and values written into the row's columns just before the next step's, and every other column after
        the prefix is blocked to the row. Positions continue each row's own sentence."""
        inputs = inputs.repeated()
        apart = GrowingCache(self.model)
        with sdpa_kernel(ADMIT_ATTENTION):
            logits = apart.prefill(inputs)
        prefix_length, width = self.prefix_length, inputs.input_ids.shape[1]
        ring = self.mask.shape[-1] - prefix_length
        offsets = torch.arange(self.column - prefix_length - width, self.column - prefix_length, device=rows.device)
        columns = prefix_length + offsets % ring
        for layer, prefilled in zip(self.cache.layers, apart.cache.layers, strict=True):
            # (rows, columns) index pairs around the head dimension: the written block is (rows, width, heads, dim)
            layer.keys[rows[:, None], :, columns] = prefilled.keys[:, :, prefix_length:].transpose(1, 2)
            layer.values[rows[:, None], :, columns] = prefilled.values[:, :, prefix_length:].transpose(1, 2)
        mask = torch.full((len(rows), self.mask.shape[-1]), self.blocked, dtype=self.mask.dtype, device=rows.device)
        mask[:, :prefix_length] = 0
        mask[:, columns] = torch.where(inputs.filled, 0, self.blocked).to(mask.dtype)
        self.mask[rows, 0, 0] = mask
        self.starts[rows] = columns[0].to(self.starts.dtype)
        self.positions[rows] = inputs.positions[:, -1:]
        return logits

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        if self.column == self.mask.shape[-1]:  # continuous batching goes round to the first column after the prefix
            self.column = self.prefix_length
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.column)
        self.input_ids.copy_(next_tokens[:, None])
        self.positions.add_(1)
        self.mask[:, 0, 0, self.column] = 0
        self.column += 1
        if self.live_columns:  # the kernel's end column; a write per step that SDPA's step does not need
            self.bounds[1] = self.column
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits

    def drop(self, alive: torch.Tensor) -> bool:
        return False  # fixed addresses: finished rows keep decoding, unrecorded

    def reorder(self, source: torch.Tensor) -> None:
        """Copied within the fixed buffers (the graph reads them there), up to the last column written."""
        for layer in self.cache.layers:
            layer.keys[:, :, : self.column] = layer.keys[source, :, : self.column]
            layer.values[:, :, : self.column] = layer.values[source, :, : self.column]
        self.mask.copy_(self.mask[source])
        self.starts.copy_(self.starts[source])
        self.positions.copy_(self.positions[source])


# Choosing the next tokens


def sampler(temperature: float, generator: torch.Generator):
    """Each row's next token drawn from softmax(logits / temperature), from ``generator``'s stream."""

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits.float() / temperature, -1)
        return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)

    return sample


class Search(Protocol):
    """How the loop turns a step's logits into every row's next token, and what it keeps of them.

    ``allowed`` (rows x vocabulary, or None: all) holds the tokens the row may say next. After ``choose``,
    ``source`` says which row each row now continues (None: itself), for the cache to be reordered after it."""

    source: torch.Tensor | None

    def choose(self, logits: torch.Tensor, allowed: torch.Tensor | None, step: int) -> torch.Tensor: ...

    def alive(self) -> torch.Tensor:
        """Whether each row still decodes."""
        ...

    def drop(self, alive: torch.Tensor) -> None:
        """Keep only the rows ``alive`` (indices), as the cache did."""
        ...

    def answers(self, count: int) -> list[list[int]]:
        """The new tokens of the first ``count`` answers (sentences' rows for a `RowSearch`, sentences for a
        `BeamSearch`), each up to its stop token or the cap."""
        ...


class RowSearch:
    """Each row answers one job (a sentence, or one of its samples) at a time: its token picked by ``pick`` (greedy
    or a sampler) and recorded at the row's own step until it says a stop token or reaches the cap. A row holds no
    job until it is admitted to one, and none again once it finished; rows without a job record into a scratch row.
    A batch admits its rows to its jobs at the start; continuous batching admits finished rows to waiting jobs."""

    source = None

    def __init__(self, rows: int, jobs: int, max_new_tokens: int, stops: torch.Tensor, pad: int, pick) -> None:
        device = stops.device
        self.pick, self.stops, self.pad, self.max_new_tokens = pick, stops, pad, max_new_tokens
        self.scratch = jobs
        self.job = torch.full((rows,), jobs, dtype=torch.long, device=device)  # the job each row answers
        self.length = torch.zeros(rows, dtype=torch.long, device=device)  # tokens of its answer so far
        self.tokens = torch.full((jobs + 1, max_new_tokens), pad, dtype=torch.long, device=device)
        self.finished = torch.ones(rows, dtype=torch.bool, device=device)

    def admit(self, rows: torch.Tensor, jobs: torch.Tensor) -> None:
        self.job[rows], self.length[rows], self.finished[rows] = jobs, 0, False

    def choose(self, logits: torch.Tensor, allowed: torch.Tensor | None, step: int) -> torch.Tensor:
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -math.inf)
        next_tokens = self.pick(logits)
        at = self.length.clamp(max=self.max_new_tokens - 1)
        self.tokens[self.job, at] = torch.where(self.finished, self.pad, next_tokens)
        self.length += 1
        self.finished |= torch.isin(next_tokens, self.stops) | (self.length == self.max_new_tokens)
        self.job = torch.where(self.finished, self.scratch, self.job)
        return next_tokens

    def alive(self) -> torch.Tensor:
        return ~self.finished

    def drop(self, alive: torch.Tensor) -> None:
        self.job, self.length, self.finished = self.job[alive], self.length[alive], self.finished[alive]

    def answers(self, count: int) -> list[list[int]]:
        return self.tokens[:count].tolist()


# A score that takes a candidate out of the running, as transformers' beam search adds it.
OUT = -1.0e9
# transformers' default: a sentence's search ends once its best running beam can't beat its finished ones; True ends
# it at its first `num_beams` finished ones.
EARLY_STOPPING = False


class BeamSearch:
    """Beam search as transformers' (`num_beams`, `do_sample=False`, `length_penalty=1.0`), each prompt's beams
    side by side in the batch (row = prompt * beams + beam).

    Per step, over every beam's log-probabilities plus its running score, the top ``2 * beams`` continuations of
    each prompt (more where several tokens stop): those that said a stop token (or reached the cap) are offered to
    the prompt's finished hypotheses, scored by log-probability per new token (the stop token counted), and the
    best ``beams`` that did not stop go on. A prompt is done once it has ``beams`` finished hypotheses and its best
    running beam, at its length so far, would score no better than the worst of them (``early_stopping`` False,
    transformers' default), or as soon as it has them (True). Its answer is its best finished hypothesis.
    ``allowed`` masks the log-probabilities, as a transformers logits processor would."""

    def __init__(
        self,
        prompts: int,
        real: int,
        beams: int,
        max_new_tokens: int,
        stops: torch.Tensor,
        pad: int,
        early_stopping: bool = False,
    ) -> None:
        device = stops.device
        self.beams, self.max_new_tokens, self.stops, self.early_stopping = beams, max_new_tokens, stops, early_stopping
        self.candidates = max(2, 1 + len(stops)) * beams
        self.first = torch.arange(self.candidates, device=device) < beams  # the candidates that may finish
        self.answering = torch.arange(prompts, device=device)  # the prompts still searching
        self.running = torch.full((prompts, beams, max_new_tokens), pad, dtype=torch.long, device=device)
        self.running_scores = torch.zeros((prompts, beams), device=device)
        self.running_scores[:, 1:] = OUT  # the beams start equal: only the first one's continuations count
        self.best = self.running.clone()  # the finished hypotheses of every prompt, best first
        self.best_scores = torch.full((prompts, beams), OUT, device=device)
        self.best_filled = torch.zeros((prompts, beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones(prompts, dtype=torch.bool, device=device)
        self.improvable[real:] = False  # a static batch's filler prompts are done from the start
        self.source: torch.Tensor | None = None

    def choose(self, logits: torch.Tensor, allowed: torch.Tensor | None, step: int) -> torch.Tensor:
        prompts, beams, vocab = len(self.answering), self.beams, logits.shape[-1]
        log_probs = torch.log_softmax(logits.float(), -1)
        if allowed is not None:
            log_probs = log_probs.masked_fill(~allowed, -math.inf)
        scores = (log_probs.view(prompts, beams, vocab) + self.running_scores[:, :, None]).view(prompts, -1)
        top_scores, top = scores.topk(self.candidates, -1)
        beam, token = top // vocab, top % vocab
        sequences = self.running.gather(1, beam[:, :, None].expand(-1, -1, self.max_new_tokens))
        sequences[:, :, step] = token
        stopped = torch.isin(token, self.stops) | (step + 1 == self.max_new_tokens)

        going_scores = top_scores + stopped * OUT
        going = going_scores.topk(beams, -1).indices
        self.running = sequences.gather(1, going[:, :, None].expand(-1, -1, self.max_new_tokens))
        self.running_scores = going_scores.gather(1, going)
        offsets = torch.arange(prompts, device=logits.device)[:, None] * beams
        self.source = (beam.gather(1, going) + offsets).flatten()

        self._offer(sequences, top_scores, stopped & self.first, step + 1)
        return token.gather(1, going).flatten()

    def _offer(self, sequences: torch.Tensor, scores: torch.Tensor, finished: torch.Tensor, length: int) -> None:
        """Merge the candidates that just finished into the prompts' best hypotheses; then whether each prompt's
        running beams could still do better."""
        at = self.answering
        best_scores, best_filled = self.best_scores[at], self.best_filled[at]
        normalized = scores / length
        full = best_filled.all(-1, keepdim=True) & self.early_stopping
        normalized = normalized + (full | ~self.improvable[at][:, None] | ~finished) * OUT
        merged_scores = torch.cat([best_scores, normalized], 1)
        kept = merged_scores.topk(self.beams, -1).indices
        merged = torch.cat([self.best[at], sequences], 1)
        self.best[at] = merged.gather(1, kept[:, :, None].expand(-1, -1, self.max_new_tokens))
        self.best_scores[at] = best_scores = merged_scores.gather(1, kept)
        self.best_filled[at] = best_filled = torch.cat([best_filled, finished], 1).gather(1, kept)
        best_running = self.running_scores[:, :1] / length
        worst = torch.where(best_filled, best_scores.min(-1, keepdim=True).values, OUT)
        self.improvable[at] &= (best_running > worst).any(-1)

    def _done(self) -> torch.Tensor:
        """Per prompt still answering."""
        at = self.answering
        return ~self.improvable[at] | (self.best_filled[at].all(-1) & self.early_stopping)

    def alive(self) -> torch.Tensor:
        return (~self._done()).repeat_interleave(self.beams)

    def drop(self, alive: torch.Tensor) -> None:
        prompts = alive.view(-1, self.beams)[:, 0] // self.beams
        self.answering = self.answering[prompts]
        self.running, self.running_scores = self.running[prompts], self.running_scores[prompts]

    def answers(self, count: int) -> list[list[int]]:
        return self.best[:count, 0].tolist()


class Generator:
    """Answers of one model to sentences under one system prompt, decoded as ``decoding`` says (default: greedy);
    the prompt's cache is built once.

    ``batch_size`` counts rows: a batch holds ``batch_size // decoding.rows`` sentences (at least one), so that
    samples or beams cost time, not memory. ``static`` forces the cache kind (True: static cache and, on a GPU,
    CUDA graphs; False: the growing cache); None chooses the static one on a GPU whose attention takes a 4D mask.
    ``continuous`` batches continuously on the static cache (`_generate_continuous`; not with beam search).
    ``live_column_attention``: the static cache's step reads only each row's prefix and own columns
    (redistill/live_attention.py), not the cache's whole width; the same answers up to rounding."""

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: str,
        max_new_tokens: int,
        batch_size: int,
        *,
        static: bool | None = None,
        decoding: Decoding = GREEDY,
        continuous: bool = False,
        live_column_attention: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_new_tokens, self.batch_size = system_prompt, max_new_tokens, batch_size
        self.decoding = decoding
        self.stops = stop_token_ids(tokenizer)
        self.device = next(model.parameters()).device
        # Static batches take a 4D mask, which flash-attention does not; on the CPU there is no launch cost to save.
        masks = getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        self.static = (self.device.type == "cuda" and masks) if static is None else static
        # A growing cache drops finished rows already; beam search keeps each sentence's beams together.
        self.continuous = continuous and self.static and decoding.num_beams == 1
        self.live_column_attention = live_column_attention and self.static
        self._prefix: list[int] | None = None
        self._prefix_cache = None
        self._static_cache: StaticGraphCache | None = None
        self._grammar: TripleGrammar | None = None
        self._random: torch.Generator | None = None

    @property
    def sentences_per_batch(self) -> int:
        return max(1, self.batch_size // self.decoding.rows)

    def prompt_ids(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text, self.system_prompt)

    @torch.inference_mode()
    def generate(self, texts: list[str], desc: str = "generate", progress: bool = True) -> list[Generation]:
        """The model's answer to each sentence, in the order of ``texts``. A sampler starts from its seed at each
        call: the same texts in the same batches give the same answers."""
        prompts = [self.prompt_ids(text) for text in texts]
        results: list[Generation | None] = [None] * len(prompts)
        if self.decoding.temperature > 0:
            self._random = torch.Generator(self.device).manual_seed(self.decoding.seed)
        with tqdm(total=len(prompts), desc=desc, unit="sentence", disable=not progress) as bar:
            if self.continuous:
                return self._generate_continuous(prompts, bar)
            batches = prompt_batches([len(prompt) for prompt in prompts], self.sentences_per_batch)
            batch_prompts = max((len(batch) for batch in batches), default=self.sentences_per_batch)  # static size
            for batch in batches:
                answers = self._generate_batch([prompts[i] for i in batch], batch_prompts)
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

    def _prefill_inputs(self, prompts: list[list[int]], prompt_rows: int) -> Prefill:
        """The first forward's inputs for ``prompt_rows`` prompts: a short batch is filled up with its last prompt,
        whose answers are decoded but never kept. Each decodes as ``decoding.rows`` rows."""
        prefix_length, prefix_cache = self._prefix_for(prompts)
        suffixes = [prompt[prefix_length:] for prompt in prompts + [prompts[-1]] * (prompt_rows - len(prompts))]
        return self._suffix_inputs(suffixes, prefix_length, prefix_cache, self.decoding.rows)

    def _suffix_inputs(self, suffixes: list[list[int]], prefix_length: int, prefix_cache, repeat: int = 1) -> Prefill:
        # padding between the shared prefix and each sentence's tokens
        input_ids, filled = left_padded(suffixes, self.tokenizer.pad_token_id, self.device)
        positions = (prefix_length + filled.long().cumsum(-1) - 1).clamp(min=prefix_length)
        return Prefill(prefix_length, prefix_cache, input_ids, filled, positions, repeat)

    def _cache(self, rows: int, length: int) -> DecodingCache:
        if not self.static:
            return GrowingCache(self.model)
        live = self.live_column_attention
        if self._static_cache is None or not self._static_cache.fits(rows, length, live):
            self._static_cache = None  # the old cache and graph go before the new ones are allocated
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._static_cache = StaticGraphCache.build(self.model, rows, length, self.device, live)
        return self._static_cache

    def _search(self, prompts: int, count: int, stops: torch.Tensor) -> Search:
        """The search over ``prompts`` prompts (of which the first ``count`` are real), each as its rows."""
        decoding, pad = self.decoding, self.tokenizer.pad_token_id
        if decoding.num_beams > 1:
            return BeamSearch(prompts, count, decoding.num_beams, self.max_new_tokens, stops, pad, EARLY_STOPPING)
        search = RowSearch(
            prompts * decoding.rows, count * decoding.rows, self.max_new_tokens, stops, pad, self._pick()
        )
        real = torch.arange(count * decoding.rows, device=self.device)  # the filler rows hold no job
        search.admit(real, real)
        return search

    def _pick(self):
        return greedy if self.decoding.temperature == 0 else sampler(self.decoding.temperature, self._random)

    def _grammar_state(self, rows: int, vocabulary: int) -> GrammarState | None:
        if not self.decoding.structured:
            return None
        if self._grammar is None or not self._grammar.fits(vocabulary, self.stops):
            self._grammar = TripleGrammar.build(self.tokenizer, vocabulary, self.stops, self.device)
        return self._grammar.start(rows, self.max_new_tokens)

    def _generate_batch(self, prompts: list[list[int]], batch_prompts: int) -> list[Generation]:
        """The answers to one batch: the decoding loop. ``batch_prompts`` is the size of a static batch."""
        count = len(prompts)
        prompt_rows = batch_prompts if self.static else count
        rows = prompt_rows * self.decoding.rows
        inputs = self._prefill_inputs(prompts, prompt_rows)
        length = inputs.prefix_length + inputs.input_ids.shape[1] + self.max_new_tokens
        cache = self._cache(rows, length)
        logits = cache.prefill(inputs)
        search = self._search(prompt_rows, count, torch.tensor(self.stops, device=self.device))
        grammar = self._grammar_state(rows, logits.shape[-1])
        for step in range(self.max_new_tokens):
            allowed = None if grammar is None else grammar.allowed(self.max_new_tokens - step)
            next_tokens = search.choose(logits, allowed, step)
            if search.source is not None:  # beam search: each row goes on from the beam it continues
                cache.reorder(search.source)
                if grammar is not None:
                    grammar.reorder(search.source)
            if grammar is not None:
                grammar.advance(next_tokens)
            if step + 1 == self.max_new_tokens:
                break
            if (step + 1) % SYNC_EVERY == 0:
                alive = search.alive().nonzero().squeeze(-1)
                if len(alive) == 0:
                    break
                if len(alive) < len(next_tokens) and cache.drop(alive):
                    search.drop(alive)
                    if grammar is not None:
                        grammar.drop(alive)
                    next_tokens = next_tokens[alive]
            logits = cache.step(next_tokens)
        return self._combine(search, count)

    def _generate_continuous(self, prompts: list[list[int]], bar: tqdm) -> list[Generation]:
        """Continuous batching: one static batch for all the prompts, whose rows take the next waiting job (a
        sentence, or one of its samples) as soon as they finish, so the batch decodes as long as its longest
        current answer, not the longest of its batch. Jobs wait shortest prompt first, so that rows admitted
        together are prefilled at nearly one width. Every SYNC_EVERY steps the host sees which rows finished and
        admits them (`StaticGraphCache.admit`); the step itself stays the one graph. Each row's answer sees what
        it would in a batch of its own: the shared prefix, its own tokens and positions, and nothing else."""
        samples = self.decoding.samples
        prefix_length, prefix_cache = self._prefix_for(prompts)
        suffixes = [prompt[prefix_length:] for prompt in prompts]
        order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
        queue = [index * samples + sample for index in order for sample in range(samples)]  # job: prompt * samples
        batches = prompt_batches([len(prompt) for prompt in prompts], self.sentences_per_batch)
        rows = max(len(batch) for batch in batches) * samples  # as many rows as batch by batch, no fill-up at the end
        cache = self._cache(rows, prefix_length + max(map(len, suffixes)) + self.max_new_tokens)
        cache.start(prefix_length, prefix_cache)
        stops = torch.tensor(self.stops, device=self.device)
        search = RowSearch(rows, len(queue), self.max_new_tokens, stops, self.tokenizer.pad_token_id, self._pick())
        logits, grammar, allowed, waiting, step = None, None, None, 0, 0
        free = torch.arange(rows, device=self.device)
        while True:
            if len(free) and waiting < len(queue):
                taken, jobs = free[: len(queue) - waiting], queue[waiting : waiting + len(free)]
                waiting += len(taken)
                for start in range(0, len(taken), ADMIT_ROWS):
                    chunk = jobs[start : start + ADMIT_ROWS]
                    inputs = self._suffix_inputs(
                        [suffixes[job // samples] for job in chunk], prefix_length, prefix_cache
                    )
                    fresh = cache.admit(taken[start : start + ADMIT_ROWS], inputs)
                    logits = fresh.new_zeros((rows, fresh.shape[-1])) if logits is None else logits
                    logits[taken[start : start + ADMIT_ROWS]] = fresh
                search.admit(taken, torch.tensor(jobs, device=self.device))
                grammar = grammar or self._grammar_state(rows, logits.shape[-1])
                if grammar is not None:
                    grammar.admit(taken)
            if grammar is not None:  # a finished row waiting for a job is past its cap: it may say anything
                allowed = grammar.allowed((self.max_new_tokens - search.length).clamp(min=1))
            next_tokens = search.choose(logits, allowed, step)
            if grammar is not None:
                grammar.advance(next_tokens)
            step += 1
            free = free[:0]
            if step % SYNC_EVERY == 0:
                finished = (~search.alive()).nonzero().squeeze(-1)
                bar.update((waiting - rows + len(finished)) // samples - bar.n)
                if len(finished) == rows and waiting == len(queue):
                    break
                if waiting < len(queue):
                    free = finished
                if len(finished) == rows:
                    continue  # no row decodes: the new ones start without a step
            logits = cache.step(next_tokens)
        return self._combine(search, len(prompts))

    def _combine(self, search: Search, count: int) -> list[Generation]:
        """One answer per sentence: its row's, its best beam's, or its samples' vote."""
        samples = self.decoding.samples
        answers = [self._decode(new) for new in search.answers(count * (1 if self.decoding.num_beams > 1 else samples))]
        if samples == 1:
            return answers
        return [
            voted(answers[start : start + samples], self.decoding.min_votes)
            for start in range(0, len(answers), samples)
        ]

    def _decode(self, new: list[int]) -> Generation:
        end = next((position for position, token in enumerate(new) if token in self.stops), None)
        kept = new if end is None else new[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        if self.decoding.structured:
            if end is None and not text.endswith("\n"):  # cut at the cap mid-line: that line is not whole
                text = text.rpartition("\n")[0]
            text = triples_text(distinct_triples(text))
        text = text.strip()
        return Generation(text=text, ended=end is not None, new_tokens=len(kept))


def voted(samples: list[Generation], min_votes: int) -> Generation:
    """One sentence's answer from its samples: the triples at least ``min_votes`` of them hold; ended when most
    samples ended at a stop token; ``new_tokens`` the samples' total (the tokens decoded for the sentence)."""
    return Generation(
        text=triples_text(vote([sample.text for sample in samples], min_votes)),
        ended=2 * sum(sample.ended for sample in samples) > len(samples),
        new_tokens=sum(sample.new_tokens for sample in samples),
    )
