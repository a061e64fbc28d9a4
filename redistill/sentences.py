"""First-sentence cutting, normalisation and stable ids.

The post cut sentences with ``text.split('.')[0]``, which breaks on "the U.S. Army", "Dr. Smith" or "version
4.5". Here a period ends a sentence only when it is followed by whitespace and a capital letter (or an opening
quote or bracket before one), and the word before it is not an abbreviation, an initial or a dotted acronym.
"""

import hashlib
import re
import unicodedata

# Words that take a period without ending a sentence (compared casefolded, without the period).
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft rev gen col lt sgt capt cmdr gov sen rep pres hon messrs mme mlle
    no nos vol vols pp ch fig figs eq approx est ca cf vs etc al ed eds trans op cit ibid viz
    inc ltd co corp bros dept univ assn jan feb mar apr jun jul aug sep sept oct nov dec
    b d c fl r lit var pop
    """.split()
)

_WHITESPACE = re.compile(r"\s+")
# A sentence-final mark, any closing quotes/brackets, then whitespace; the sentence ends after the closers.
_BOUNDARY = re.compile(r"(?P<mark>[.!?])(?P<close>[\"'\u201d\u2019)\]]*)(?=\s)")
_NEXT_STARTS_SENTENCE = re.compile(r"\s+[\"'\u201c\u2018(\[]?[A-Z\u00C0-\u024F\u0370-\u03FF\u0400-\u04FF]")
_WORD_BEFORE = re.compile(r"([\w.]+)$")
_DECIMAL = re.compile(r"\d+(?:[.,]\d+)+")


def collapse_whitespace(text: str) -> str:
    """Newlines, tabs and runs of spaces become one space; ends are stripped."""
    return _WHITESPACE.sub(" ", text).strip()


def is_abbreviation(word: str) -> bool:
    """Whether ``word`` (without its final period) is one that takes a period: "Dr", "U.S", "J", "e.g"."""
    if _DECIMAL.fullmatch(word):  # "7.4" ends a sentence like any number
        return False
    if "." in word:  # U.S, e.g, F.C, J.R.R: a dotted acronym
        return True
    if len(word) == 1 and word.isalpha():  # an initial: "J. R. R. Tolkien", "(b. 1950)"
        return True
    return word.casefold() in ABBREVIATIONS


def _ends_sentence(text: str, match: re.Match) -> bool:
    if not _NEXT_STARTS_SENTENCE.match(text, match.end()):
        return False
    if match["mark"] != ".":
        return True
    word = _WORD_BEFORE.search(text, 0, match.start())
    return word is None or not is_abbreviation(word.group(1))


def first_sentence(text: str) -> str:
    """The first sentence of ``text``, with whitespace collapsed; the whole text if it has no boundary."""
    text = collapse_whitespace(text)
    for match in _BOUNDARY.finditer(text):
        if _ends_sentence(text, match):
            return text[: match.end()]
    return text


def split_sentences(text: str) -> list[tuple[int, str]]:
    """Every sentence of ``text`` (whitespace collapsed) with the offset in ``text`` where it starts."""
    sentences, start = [], 0
    for match in [*_BOUNDARY.finditer(text), None]:
        if match is not None and not _ends_sentence(text, match):
            continue
        end = len(text) if match is None else match.end()
        piece = text[start:end]
        if piece.strip():
            sentences.append((start + len(piece) - len(piece.lstrip()), collapse_whitespace(piece)))
        start = end
    return sentences


def normalize(text: str) -> str:
    """The form two sentences are compared in: NFKC, casefolded, whitespace collapsed."""
    return collapse_whitespace(unicodedata.normalize("NFKC", text).casefold())


def sentence_id(text: str) -> str:
    """A stable id: the first 16 hex digits of the SHA-256 of the normalised text."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()[:16]
