"""The structured floor under every decoding (`structured: true`): answers held to `head|relation|tail` lines.

A line is three parts split by two `|`, each holding a character that is not a space; a newline ends a whole line
only, and the end-of-turn token may come only where a line could end (after a whole line, or at the start: no
triples). So every line parses as a triple, as redistill/triples.py reads them. An answer also stops once it
repeats a line it wrote (compared ignoring case, spaces, quotes and `.,;:!?`): the next token must be a stop token.
Near the cap only tokens after which the answer can still end in time are allowed, so an answer ends at a stop token
before the cap whenever the vocabulary can spell a line that short (its last line then is cut short).

What a token does to a line is worked out once per tokenizer: from each state of a line (how many `|` it holds, and
whether its current part has a character yet) the state it leads to, or none. Masking a step is then one lookup per
row, on the device, outside the CUDA graph (the graph returns the logits; the choice is made after it). Repeats are
caught by a rolling hash of each line, composed from per-token hashes, also on the device.

Why not a library: llguidance 1.9.1 installs from PyPI and builds masks for our tokenizers on the CPU; xgrammar
0.2.9 does not import without its tvm_ffi dependency. Both run a matcher per row on the host, fed each row's token
at every step: the host waits for the GPU at every step, where this loop waits only every SYNC_EVERY steps. And the
language is regular with six states, which a (state x vocabulary) table runs exactly.
"""

import unicodedata
from dataclasses import dataclass

import torch

from redistill.scoring import QUOTES, TRAILING_PUNCTUATION

# Characters where str.splitlines cuts a line (as parse_answer splits an answer); only "\n" may end one here.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
IGNORED = frozenset(QUOTES + TRAILING_PUNCTUATION)  # left out of the repeat hash, with spaces and case
MOD, BASE = 2**31 - 1, 1_000_003  # the line hash: a polynomial mod a prime; a product of two fits in int64
STATES = 6  # 2 * pipes + filled, pipes in 0..2: 0 is a line's start, 5 a whole line
MUST_STOP = STATES  # after a repeated line: only a stop token
LINE_ENDS = (0, 5)  # where a stop token may come
FAR = 1 << 20  # the cost of what can't end


def line_state(text: str, state: int) -> int:
    """The state of a line after ``text``, from ``state``; -1 where ``text`` breaks the line."""
    pipes, filled = divmod(state, 2)
    for char in text:
        if char == "|":
            if not filled or pipes == 2:
                return -1
            pipes, filled = pipes + 1, False
        elif char == "\n":
            if pipes < 2 or not filled:
                return -1
            pipes, filled = 0, False
        elif char in LINE_BREAKS:
            return -1
        elif not char.isspace():
            filled = True
    return 2 * pipes + filled


def text_hash(text: str) -> tuple[int, int]:
    """The hash of ``text`` as a line compares (case, spaces and IGNORED left out), and BASE to its length: a
    line's hash is ``line * power + hash`` for each token it adds."""
    value, power = 0, 1
    for char in unicodedata.normalize("NFKC", text).casefold():
        if not char.isspace() and char not in IGNORED:
            value, power = (value * BASE + ord(char) + 1) % MOD, power * BASE % MOD
    return value, power


@dataclass(frozen=True)
class TripleGrammar:
    """Per-token tables for one tokenizer, vocabulary and set of stop tokens, on the device."""

    vocabulary: int
    stops: tuple[int, ...]
    next_state: torch.Tensor  # (STATES + 1, vocabulary): the state after each token, -1 where it breaks the line
    allowed_within: torch.Tensor  # (budgets, STATES + 1, vocabulary): allowed with that many tokens left (last: any)
    head_hash: torch.Tensor  # (vocabulary,): of each token's text up to its newline (all of it, without one)
    head_power: torch.Tensor
    tail_hash: torch.Tensor  # of the text after its newline
    newline: torch.Tensor  # (vocabulary,) bool: it ends a line

    @classmethod
    def build(cls, tokenizer, vocabulary: int, stops: list[int], device: torch.device) -> "TripleGrammar":
        known = min(vocabulary, len(tokenizer))
        texts = tokenizer.batch_decode(
            [[token] for token in range(known)], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        special = set(tokenizer.all_special_ids) - set(stops)
        content = [0 if token in special else 2 for token in range(vocabulary)]  # 0 never, 1 spaces, 2 a part's
        by_state: dict[int, list[int]] = {}  # tokens with a "|" or a line break: their states one by one
        hashes = [[0] * vocabulary, [1] * vocabulary, [0] * vocabulary]  # head hash, head power, tail hash
        newline = [False] * vocabulary
        for token, text in enumerate(texts):
            if token in special or text.count("\n") > 1:
                content[token] = 0
                continue
            if "|" in text or LINE_BREAKS.intersection(text):
                by_state[token] = [line_state(text, state) for state in range(STATES)]
            elif text.isspace() or not text:
                content[token] = 1
            head, found, tail = text.partition("\n")
            (hashes[0][token], hashes[1][token]), hashes[2][token] = text_hash(head), text_hash(tail)[0]
            newline[token] = bool(found)
        content[known:] = [0] * (vocabulary - known)
        kind = torch.tensor(content)
        states = torch.arange(STATES)[:, None]
        next_state = torch.full((STATES + 1, vocabulary), -1, dtype=torch.long)
        next_state[:STATES] = torch.where(kind == 2, states | 1, torch.where(kind == 1, states, -1))
        if by_state:
            next_state[:STATES, list(by_state)] = torch.tensor(list(by_state.values())).T
        stop = torch.zeros(vocabulary, dtype=torch.bool)
        stop[list(stops)] = True
        next_state[:, stop] = -1
        next_state[[*LINE_ENDS, MUST_STOP], :] = torch.where(stop, 0, next_state[[*LINE_ENDS, MUST_STOP], :])
        next_state[MUST_STOP, ~stop] = -1
        cost = cls._cost_to_end(next_state, stop)
        budgets = int(cost[cost < FAR].max())
        allowed_within = torch.stack([cost <= budget for budget in range(budgets + 1)])
        return cls(
            vocabulary,
            tuple(stops),
            next_state.to(device),
            allowed_within.to(device),
            *(torch.tensor(row, device=device) for row in hashes),
            torch.tensor(newline, device=device),
        )

    @staticmethod
    def _cost_to_end(next_state: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
        """(state, token): the fewest tokens to a stop token when this token comes next, counting it; FAR where
        none can follow."""
        distance = torch.full((STATES + 1,), FAR, dtype=torch.long)
        valid = next_state >= 0
        while True:  # shortest paths over seven states: settled within seven rounds
            cost = torch.where(valid, 1 + distance[next_state.clamp(min=0)], FAR).clamp(max=FAR)
            cost = torch.where(valid & stop, 1, cost)
            shorter = cost.min(-1).values
            if torch.equal(shorter, distance):
                return cost
            distance = shorter

    def fits(self, vocabulary: int, stops: list[int]) -> bool:
        return self.vocabulary == vocabulary and self.stops == tuple(stops)

    def start(self, rows: int, max_new_tokens: int) -> "GrammarState":
        return GrammarState(self, rows, max_new_tokens)


class GrammarState:
    """Where each row's answer stands: its line's state and hash, and the hashes of its whole lines so far."""

    def __init__(self, grammar: TripleGrammar, rows: int, max_lines: int) -> None:
        device = grammar.next_state.device
        self.grammar = grammar
        self.state = torch.zeros(rows, dtype=torch.long, device=device)
        self.line = torch.zeros(rows, dtype=torch.long, device=device)
        self.seen = torch.full((rows, max_lines), -1, dtype=torch.long, device=device)  # hashes are >= 0
        self.lines = torch.zeros(rows, dtype=torch.long, device=device)

    def allowed(self, remaining: int | torch.Tensor) -> torch.Tensor:
        """(rows, vocabulary) bool: the tokens each row may say next, with ``remaining`` tokens left to it (one
        count for all rows, or each row's: continuous batching's rows are at different steps of their answers)."""
        tables = self.grammar.allowed_within
        if isinstance(remaining, int):
            return tables[min(remaining, len(tables) - 1)][self.state]
        return tables[remaining.clamp(max=len(tables) - 1), self.state]

    def admit(self, rows: torch.Tensor) -> None:
        """These rows start new answers."""
        self.state[rows], self.line[rows], self.seen[rows], self.lines[rows] = 0, 0, -1, 0

    def advance(self, tokens: torch.Tensor) -> None:
        grammar = self.grammar
        line = (self.line * grammar.head_power[tokens] + grammar.head_hash[tokens]) % MOD
        ends = grammar.newline[tokens]
        repeated = ends & (self.seen == line[:, None]).any(-1)
        slot = self.lines.clamp(max=self.seen.shape[1] - 1)[:, None]
        self.seen.scatter_(1, slot, torch.where(ends[:, None], line[:, None], self.seen.gather(1, slot)))
        self.lines += ends
        self.line = torch.where(ends, grammar.tail_hash[tokens], line)
        state = grammar.next_state[self.state, tokens]
        self.state = torch.where(repeated | (state < 0), MUST_STOP, state)  # < 0: a beam out of the running

    def _select(self, rows: torch.Tensor) -> None:
        self.state, self.line, self.seen, self.lines = (
            self.state[rows],
            self.line[rows],
            self.seen[rows],
            self.lines[rows],
        )

    def reorder(self, source: torch.Tensor) -> None:
        self._select(source)

    def drop(self, alive: torch.Tensor) -> None:
        self._select(alive)
