"""`redistill graph` and the evaluate stage's test graph: GraphML for networkx, an offline page in real Chromium."""

import json
from pathlib import Path

import networkx
from browser import open_page

from redistill.cli import main
from redistill.graph import Graph, gold_and_predicted_graph, write_html

RECORDS = [
    {"id": "a", "sentence": "Marie Curie was born in Warsaw.", "triples": [["Marie Curie", "was born in", "Warsaw"]]},
    {
        "id": "b",
        "sentence": "marie  curie won the Nobel Prize; Warsaw is in Poland.",
        "triples": [["marie curie", "won", "the Nobel Prize"], ["Warsaw", "is in", "Poland"]],
    },
    {"id": "c", "sentence": "Nothing here.", "triples": []},
]
READY = "return document.body.dataset.ready === '1'"


def write_records(path: Path) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return path


def test_graph_merges_entities_by_normalised_name_and_loads_in_networkx(tmp_path):
    source = write_records(tmp_path / "triples.jsonl")
    assert main(["graph", str(source), "-o", str(tmp_path / "kg")]) == 0
    graph = networkx.read_graphml(tmp_path / "kg.graphml")
    labels = sorted(data["label"] for _, data in graph.nodes(data=True))
    assert labels == ["Marie Curie", "Poland", "Warsaw", "the Nobel Prize"]  # "marie curie" joined "Marie Curie"
    assert sorted(data["label"] for *_, data in graph.edges(data=True)) == ["is in", "was born in", "won"]
    marie = next(node for node, data in graph.nodes(data=True) if data["label"] == "Marie Curie")
    assert graph.nodes[marie]["degree"] == 2 and json.loads(graph.nodes[marie]["sentences"]) == ["a", "b"]


def test_graph_reads_answer_strings_from_predictions_and_csv(tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"id": "a", "text": "A sentence.", "gold": "X|r|Y", "finetuned": "- X|r|Y.\nprose\nZ|s|Y"}]
    predictions.write_text(json.dumps(rows[0]) + "\n")
    assert main(["graph", str(predictions), "-o", str(tmp_path / "p")]) == 0  # finetuned by default
    assert networkx.read_graphml(tmp_path / "p.graphml").number_of_edges() == 2
    assert main(["graph", str(predictions), "--column", "gold", "-o", str(tmp_path / "g")]) == 0
    assert networkx.read_graphml(tmp_path / "g.graphml").number_of_edges() == 1
    csv_file = tmp_path / "out.csv"
    csv_file.write_text('id,sentence,source,triples,ended\na,S.,f:1,"[[""X"", ""r"", ""Y""]]",True\n')
    assert main(["graph", str(csv_file), "-o", str(tmp_path / "c")]) == 0
    assert networkx.read_graphml(tmp_path / "c.graphml").number_of_edges() == 1


def test_graph_with_a_missing_column_is_one_line(tmp_path, capsys):
    source = write_records(tmp_path / "triples.jsonl")
    assert main(["graph", str(source), "--column", "answer", "-o", str(tmp_path / "kg")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {source}: row 1 has no column 'answer'; choose one with --column"
    )
    assert not list(tmp_path.glob("kg*"))


def test_the_page_draws_the_graph_offline_with_search_and_sentences(chromium, tmp_path):
    source = write_records(tmp_path / "triples.jsonl")
    assert main(["graph", str(source), "-o", str(tmp_path / "kg"), "--title", "Curie </script> & co"]) == 0
    page = tmp_path / "kg.html"
    assert "<script src" not in page.read_text()
    visit = open_page(chromium, page, READY)
    assert visit.console_errors == [] and visit.network_requests == []
    counts = chromium.execute_script("const cy = window.redistillGraph; return [cy.nodes().length, cy.edges().length]")
    assert counts == [4, 3]
    assert chromium.find_element("id", "counts").text == "4 entities, 3 relations"
    assert chromium.title == "Curie </script> & co"
    sizes = chromium.execute_script(
        "return Object.fromEntries(window.redistillGraph.nodes().map(n => [n.data('label'), n.width()]))"
    )
    assert sizes["Marie Curie"] > sizes["Poland"]  # size by degree

    search = chromium.find_element("id", "search")
    search.send_keys("poland")
    matched = chromium.execute_script("return window.redistillGraph.$('.match').map(n => n.data('label'))")
    assert matched == ["Poland"]
    chromium.execute_script("window.redistillGraph.nodes().filter(n => n.data('label') === 'Marie Curie').emit('tap')")
    details = chromium.find_element("id", "details").text
    assert "Marie Curie (2 relations)" in details
    assert "Marie Curie was born in Warsaw." in details and "marie curie won the Nobel Prize" in details


def test_the_evaluate_page_tells_gold_and_predicted_edges_apart(chromium, tmp_path):
    test = [
        {"id": "a", "text": "Ann lives in Rome.", "triples": [["Ann", "lives in", "Rome"], ["Rome", "is in", "Italy"]]},
        {"id": "b", "text": "Bob likes Oslo.", "triples": [["Bob", "likes", "Oslo"]]},
    ]
    rows = [{"finetuned": "Ann|lives in|Rome\nAnn|is|Roman"}, {"finetuned": "bob|likes|Oslo."}]
    graph = gold_and_predicted_graph(test, rows, "finetuned")
    write_html(graph, tmp_path / "test.html", "Test split")
    visit = open_page(chromium, tmp_path / "test.html", READY)
    assert visit.console_errors == [] and visit.network_requests == []
    kinds = chromium.execute_script("return window.redistillGraph.edges().map(e => e.data('kind')).sort()")
    assert kinds == ["correct", "correct", "gold", "predicted"]
    assert [entry.text for entry in chromium.find_elements("css selector", "#legend span")] == [
        "gold and predicted",
        "predicted only",
        "gold only (missed)",
    ]


def test_a_large_graph_still_renders(chromium, tmp_path):
    count = 2000  # past the force-directed layout's limit: drawn in concentric rings by degree
    graph = Graph()
    for index in range(count):
        graph.add([f"Person{index}", "born in", f"City{index % 50}"], str(index), f"Person{index} was born here.")
    write_html(graph, tmp_path / "big.html", "big")
    visit = open_page(chromium, tmp_path / "big.html", READY)
    assert visit.console_errors == []
    assert chromium.execute_script("return window.redistillGraph.nodes().length") == count + 50
