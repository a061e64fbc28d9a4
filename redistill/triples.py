"""Parse a teacher's or student's answer into triples ``head|relation|tail``, counting what is not one."""

import re
from dataclasses import dataclass, field

from redistill.sentences import is_abbreviation

# "- ", "* ", "• ", "1. ", "2) " at the start of a line.
_BULLET = re.compile(r"^(?:[-*•]|\d+[.)])\s+")
# Terminal escape sequences: CSI ("ESC [ 1 m", colours and cursor moves), OSC ("ESC ] ... BEL" or "... ESC \",
# titles and links), and the two-character ones ("ESC c"); then any C0 or C1 control character left.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")

Triple = tuple[str, str, str]


@dataclass
class ParsedAnswer:
    triples: list[Triple] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # lines with a "|" that are not three non-empty parts
    prose: list[str] = field(default_factory=list)  # lines without a "|": preambles, chatter
    stripped: int = 0  # lines that held control characters or terminal escapes (clean_label removes them)


def parse_answer(answer: str) -> ParsedAnswer:
    """Split into lines, strip whitespace and a leading bullet or number, keep lines of exactly three parts."""
    return _parse_lines(answer.splitlines())


def _parse_lines(lines: list[str]) -> ParsedAnswer:
    parsed = ParsedAnswer()
    for raw_line in lines:
        line = _BULLET.sub("", raw_line.strip())
        if not line:
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) == 3 and all(parts):
            parsed.triples.append((parts[0], parts[1], parts[2]))
        elif "|" in line:
            parsed.malformed.append(line)
        else:
            parsed.prose.append(line)
    return parsed


def _strip_final_period(part: str) -> str:
    """ "chess." -> "chess", but "Manchester United F.C." and "Apple Inc." keep the period that belongs to them."""
    if not part.endswith("."):
        return part
    last_word = part[:-1].rsplit(None, 1)[-1] if part[:-1].strip() else ""
    # A lone letter ("Vitamin B.") is more likely a sentence-final period than an initial.
    return part if len(last_word) > 1 and is_abbreviation(last_word) else part[:-1].strip()


def _without_controls(line: str) -> str:
    """``line`` without terminal escapes and control characters (tabs are kept)."""
    return _CONTROL.sub("", _ANSI.sub("", line))


def clean_label(answer: str) -> ParsedAnswer:
    """A teacher answer as training labels: terminal escapes and control characters removed from every line
    (counted in ``stripped``; tabs become spaces), parsed, a final period stripped from each part (unless it closes
    an abbreviation such as "F.C." or "Inc."), duplicates dropped."""
    lines = [line.replace("\t", " ") for line in answer.splitlines()]
    cleaned = [_without_controls(line) for line in lines]
    parsed = _parse_lines(cleaned)
    parsed.stripped = sum(before != after for before, after in zip(lines, cleaned, strict=True))
    cleaned: list[Triple] = []
    for triple in parsed.triples:
        stripped = tuple(_strip_final_period(part) for part in triple)
        if all(stripped) and stripped not in cleaned:
            cleaned.append(stripped)
        elif not all(stripped):
            parsed.malformed.append("|".join(triple))
    parsed.triples = cleaned
    return parsed
