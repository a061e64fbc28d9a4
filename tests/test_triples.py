from redistill.triples import clean_label, parse_answer


def test_clean_answer_one_triple_per_line():
    parsed = clean_label("Alice|is from|France\nBob|works at|Acme")
    assert parsed.triples == [("Alice", "is from", "France"), ("Bob", "works at", "Acme")]
    assert parsed.malformed == parsed.prose == []


def test_preamble_and_chatter_are_dropped_and_counted():
    parsed = clean_label("Here are the relations:\n\nAlice|is from|France\nLet me know if you need more.")
    assert parsed.triples == [("Alice", "is from", "France")]
    assert parsed.prose == ["Here are the relations:", "Let me know if you need more."]


def test_bullets_and_numbering_are_stripped():
    answer = "- A|r|B\n* C|r|D\n• E|r|F\n1. G|r|H\n12) I|r|J\n  -   K | r | L  "
    assert clean_label(answer).triples == [
        ("A", "r", "B"),
        ("C", "r", "D"),
        ("E", "r", "F"),
        ("G", "r", "H"),
        ("I", "r", "J"),
        ("K", "r", "L"),
    ]


def test_trailing_period_is_stripped_from_each_part():
    parsed = clean_label("Stalemate|is a situation in|chess.\nU.S. Army|was founded in|1775.")
    assert parsed.triples == [("Stalemate", "is a situation in", "chess"), ("U.S. Army", "was founded in", "1775")]


def test_a_period_that_closes_an_abbreviation_is_kept():
    parsed = clean_label(
        "Matt Busby|managed|Manchester United F.C.\nApple Inc.|was founded in|1976.\nX|born in|the U.S."
    )
    assert parsed.triples == [
        ("Matt Busby", "managed", "Manchester United F.C."),
        ("Apple Inc.", "was founded in", "1976"),
        ("X", "born in", "the U.S."),
    ]


def test_wrong_number_of_parts_or_empty_parts_are_malformed():
    parsed = clean_label("A|r\nA|r|B|C\nA||B\n|r|B\nA|r|.\nok|r|fine")
    assert parsed.triples == [("ok", "r", "fine")]
    assert parsed.malformed == ["A|r", "A|r|B|C", "A||B", "|r|B", "A|r|."]


def test_duplicate_triples_are_kept_once():
    assert clean_label("A|r|B\nA|r|B.\n- A|r|B").triples == [("A", "r", "B")]


def test_parse_keeps_trailing_periods_for_the_scorer():
    assert parse_answer("A|r|B.").triples == [("A", "r", "B.")]


def test_empty_answer():
    parsed = clean_label("   \n\n")
    assert parsed.triples == parsed.malformed == parsed.prose == []


def test_control_characters_and_terminal_escapes_are_stripped_and_counted():
    answer = "\x1b[1mAl\x00ice\x1b[0m|is\tfrom|France\x07\n\x1b]0;title\x07- Bob|works at|Acme\nC|r|D"
    parsed = clean_label(answer)
    assert parsed.triples == [("Alice", "is from", "France"), ("Bob", "works at", "Acme"), ("C", "r", "D")]
    assert parsed.stripped == 2 and clean_label("A|r|\x1b[31m\x1b[0m").malformed == ["A|r|"]
