import pytest

from redistill.sentences import collapse_whitespace, first_sentence, normalize, sentence_id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The U.S. Army was founded in 1775. It is old.", "The U.S. Army was founded in 1775."),
        ("Dr. Smith treated him. Later he left.", "Dr. Smith treated him."),
        ("J. R. R. Tolkien wrote The Hobbit. It sold.", "J. R. R. Tolkien wrote The Hobbit."),
        ("Python version 4.5 is out. Upgrade now.", "Python version 4.5 is out."),
        ("He wore the No. 5 shirt. Then he retired.", "He wore the No. 5 shirt."),
        ("Jane Roe (b. 1950) is a painter. She lives in Rome.", "Jane Roe (b. 1950) is a painter."),
        ("Some birds, e.g. this one, sing. Others do not.", "Some birds, e.g. this one, sing."),
        ("That is, i.e. Mostly, a test. Yes.", "That is, i.e. Mostly, a test."),
        ("Apple Inc. Was it founded in 1976? Yes. Really.", "Apple Inc. Was it founded in 1976?"),
        ("St. Louis lies on the Mississippi River. It is big.", "St. Louis lies on the Mississippi River."),
        ("Is it true? Yes it is.", "Is it true?"),
        ("Wow! That works.", "Wow!"),
        ('He said "Stop." Then he left.', 'He said "Stop."'),
        ("It rains (mostly in May.) Then it stops.", "It rains (mostly in May.)"),
        ("Prices fell 3.5 percent in 2020. Then rose.", "Prices fell 3.5 percent in 2020."),
        (
            "Dar es Salaam (lit. 'abode of peace') is a city. It is big.",
            "Dar es Salaam (lit. 'abode of peace') is a city.",
        ),
        ("Blood has a pH of about 7.4. The body keeps it there.", "Blood has a pH of about 7.4."),
        ("It sold 1,250,000 copies. Critics liked it.", "It sold 1,250,000 copies."),
        (
            "He played for Manchester United F.C. He later coached.",
            "He played for Manchester United F.C. He later coached.",
        ),
        ("No boundary here", "No boundary here"),
        ("Ends at the end.", "Ends at the end."),
        ("Lower case after a period. keeps going. Then stops.", "Lower case after a period. keeps going."),
    ],
)
def test_first_sentence(text, expected):
    assert first_sentence(text) == expected


def test_newlines_inside_a_context_are_whitespace():
    assert first_sentence("The river\nflows north\r\n into the   sea. Next.") == "The river flows north into the sea."
    assert first_sentence("First line.\nSecond line.") == "First line."


def test_collapse_whitespace():
    assert collapse_whitespace("  a\t b\n\nc  ") == "a b c"


def test_normalize_folds_case_width_and_space():
    assert normalize("The  U.S.\nArmy") == normalize("the u.s. army")
    assert normalize("\uff21\uff22\uff23") == "abc"  # NFKC: full-width letters


def test_sentence_id_is_stable_and_normalised():
    assert sentence_id("The U.S. Army") == sentence_id("the  u.s. ARMY")
    assert sentence_id("a") != sentence_id("b")
    # Pinned: ids must never change between releases, or journals and splits stop matching.
    assert sentence_id("Alice is from France.") == "d1965b53da38b39c"
    assert len(sentence_id("x")) == 16
