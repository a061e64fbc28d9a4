"""How the generator chooses an answer's tokens: the settings, declared once for params.yaml's `evaluate.decoding`
block and `redistill extract`'s options, and what turns decoded texts into an answer (voting over samples, dropping
repeated triples). Free of torch, so that `redistill`'s command line builds its options without loading it.

The defaults are greedy decoding, token for token as before these settings existed.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from redistill.params import Check, at_least, checks_of, param, positive
from redistill.prompts import answer_text
from redistill.scoring import distinct, triple_key
from redistill.triples import Triple, parse_answer


def setting(default: object, help: str, *checks: Check):
    """A decoding setting: its default (greedy decoding's), its help text and its checks."""
    return dataclasses.field(default=default, metadata=param(help, *checks).metadata)


@dataclass(frozen=True)
class Decoding:
    num_beams: int = setting(
        1,
        "beams per sentence: beam search keeps the likeliest answers and returns the best finished one, scored by "
        "log-probability per token (transformers' `length_penalty` 1.0); 1: off; not with `samples` > 1",
        positive,
    )
    samples: int = setting(
        1,
        "answers sampled per sentence (self-consistency): the answer is the triples found in at least `min_votes` "
        "of them, in order of first appearance; 1: one answer; > 1 needs `temperature` > 0",
        positive,
    )
    temperature: float = setting(
        0.0, "sampling temperature (the next token drawn from softmax(logits / T)); 0: the likeliest token", at_least(0)
    )
    min_votes: int = setting(
        1,
        "with `samples` > 1: of how many a triple must be part (as exact F1 compares them); at most `samples`",
        positive,
    )
    seed: int = setting(
        0, "the sampler's seed: the same seed, sentences and batch size give the same answers", at_least(0)
    )
    structured: bool = setting(
        False,
        "hold every answer to `head|relation|tail` lines of three non-empty parts that end at the end-of-turn token, "
        "stop an answer once it repeats a triple, and drop repeated triples",
    )

    @property
    def rows(self) -> int:
        """Rows of a batch that decode one sentence: its beams or samples."""
        return self.num_beams * self.samples

    def error(self, key: Callable[[str], str]) -> str | None:
        """What is wrong with these settings, worded with ``key(name)`` for each setting (a params.yaml key, a
        command-line option); None when nothing is."""
        for field in dataclasses.fields(self):
            for check in checks_of(field):
                problem = check.error(getattr(self, field.name))
                if problem is not None:
                    return f"{key(field.name)} {problem}"
        if self.samples > 1 and self.temperature == 0:
            return f"{key('samples')} > 1 needs {key('temperature')} > 0 (greedy samples are all one answer)"
        if self.min_votes > self.samples:
            return f"{key('min_votes')} must be at most {key('samples')} ({self.samples}), got {self.min_votes}"
        if self.num_beams > 1 and self.samples > 1:
            return f"{key('num_beams')} and {key('samples')} can't both be above 1: beam search does not sample"
        if self.num_beams > 1 and self.temperature > 0:
            return f"{key('num_beams')} > 1 searches for the likeliest answer: it needs {key('temperature')} 0"
        return None

    def settings(self) -> dict:
        """The settings by name, as an output's sidecar and metrics/eval.json record them."""
        return dataclasses.asdict(self)


GREEDY = Decoding()


def distinct_triples(answer: str) -> list[Triple]:
    """The triples of an answer, each once (the first spelling of each normalised triple), in order."""
    return distinct(parse_answer(answer).triples)


def vote(answers: list[str], min_votes: int) -> list[Triple]:
    """The triples that at least ``min_votes`` of the answers hold (each answer votes once for a triple), in order of
    first appearance and in their first spelling."""
    first: dict[Triple, Triple] = {}
    votes: dict[Triple, int] = {}
    for answer in answers:
        for triple in distinct_triples(answer):
            key = triple_key(triple)
            first.setdefault(key, triple)
            votes[key] = votes.get(key, 0) + 1
    return [triple for key, triple in first.items() if votes[key] >= min_votes]


def triples_text(triples: list[Triple]) -> str:
    return answer_text([list(triple) for triple in triples])
