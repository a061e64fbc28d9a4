"""`redistill graph`: triples into a knowledge graph, as GraphML and as one self-contained HTML page.

Nodes are entities merged by normalised name (NFKC, casefolded, whitespace collapsed) and labelled with their most
frequent spelling; edges are (head, relation, tail) with the sentences that state them. The page draws the graph
with cytoscape.js, inlined from redistill/assets/cytoscape (no network): node size by degree, a search box, and a
click on a node lists its sentences. Edges may carry a kind (the evaluate stage's gold, predicted, correct).
"""

import argparse
import csv
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from redistill.errors import PipelineError
from redistill.io import atomic_path, read_jsonl
from redistill.sentences import normalize
from redistill.triples import clean_label

ASSETS = resources.files("redistill") / "assets"


@dataclass
class Node:
    names: Counter = field(default_factory=Counter)
    sentences: dict[str, str] = field(default_factory=dict)  # id -> sentence

    @property
    def label(self) -> str:
        return self.names.most_common(1)[0][0]


@dataclass
class Edge:
    names: Counter = field(default_factory=Counter)
    kinds: set[str] = field(default_factory=set)
    sentences: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.names.most_common(1)[0][0]


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: dict[tuple[str, str, str], Edge] = field(default_factory=dict)

    def add(self, triple: list[str] | tuple[str, ...], sentence_id: str, sentence: str, kind: str = "") -> None:
        head, relation, tail = (" ".join(part.split()) for part in triple)
        keys = []
        for name in (head, tail):
            key = normalize(name)
            node = self.nodes.setdefault(key, Node())
            node.names[name] += 1
            node.sentences[sentence_id] = sentence
            keys.append(key)
        edge = self.edges.setdefault((keys[0], normalize(relation), keys[1]), Edge())
        edge.names[relation] += 1
        edge.kinds.add(kind)
        edge.sentences[sentence_id] = sentence

    def degree(self) -> Counter:
        degree = Counter()
        for head, _, tail in self.edges:
            degree[head] += 1
            degree[tail] += 1
        return degree


def gold_and_predicted_graph(test: list[dict], rows: list[dict], model: str) -> Graph:
    """The test split's gold triples and ``model``'s predicted ones in one graph, each edge marked by where it
    comes from (an edge in both is drawn as correct)."""
    graph = Graph()
    for record, row in zip(test, rows, strict=True):
        for triple in record["triples"]:
            graph.add(triple, record["id"], record["text"], "gold")
        for triple in clean_label(row[model]).triples:
            graph.add(triple, record["id"], record["text"], "predicted")
    return graph


def edge_kind(kinds: set[str]) -> str:
    """``correct`` for an edge both gold and predicted; else its one kind."""
    return "correct" if {"gold", "predicted"} <= kinds else "/".join(sorted(kinds))


def cytoscape_elements(graph: Graph) -> dict:
    degree = graph.degree()
    ids = {key: f"n{index}" for index, key in enumerate(graph.nodes)}
    nodes = [
        {
            "data": {
                "id": ids[key],
                "label": node.label,
                "degree": degree[key],
                "sentences": list(node.sentences.values()),
            }
        }
        for key, node in graph.nodes.items()
    ]
    edges = [
        {
            "data": {
                "id": f"e{index}",
                "source": ids[head],
                "target": ids[tail],
                "label": edge.label,
                "kind": edge_kind(edge.kinds),
                "sentences": list(edge.sentences.values()),
            }
        }
        for index, ((head, _, tail), edge) in enumerate(graph.edges.items())
    ]
    return {"nodes": nodes, "edges": edges}


def write_html(graph: Graph, path: str | Path, title: str) -> None:
    """One page that needs nothing but itself: the template with the library and the graph inlined."""
    template = (ASSETS / "graph.html").read_text(encoding="utf-8")
    library = (ASSETS / "cytoscape" / "cytoscape.min.js").read_text(encoding="utf-8")
    # "</" inside a script element would end it early: JSON allows "<\/" for the same characters.
    data = json.dumps(cytoscape_elements(graph), ensure_ascii=False).replace("</", "<\\/")
    page = (
        template.replace("{{title}}", _escape(title))
        .replace("/*{{cytoscape}}*/", library.replace("</script", "<\\/script"))
        .replace("{{graph}}", data)
    )
    with atomic_path(path) as temp:
        temp.write_text(page, encoding="utf-8")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_graphml(graph: Graph, path: str | Path) -> None:
    """GraphML (Gephi, networkx, yEd): a directed multigraph, node and edge labels, sentences as JSON strings."""
    import networkx

    digraph = networkx.MultiDiGraph()
    degree = graph.degree()
    for key, node in graph.nodes.items():
        digraph.add_node(key, label=node.label, degree=degree[key], sentences=json.dumps(list(node.sentences)))
    for (head, _, tail), edge in graph.edges.items():
        digraph.add_edge(
            head, tail, label=edge.label, kind=edge_kind(edge.kinds), sentences=json.dumps(list(edge.sentences))
        )
    with atomic_path(path) as temp:
        networkx.write_graphml(digraph, temp)


# Reading triples


def triples_in(value: object, where: str) -> list[list[str]]:
    """Triples from a list of [head, relation, tail] (extract's output) or an answer string (predictions)."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):  # extract's CSV/TSV holds the list as JSON
            try:
                return triples_in(json.loads(stripped), where)
            except json.JSONDecodeError:
                pass
        return [list(triple) for triple in clean_label(value).triples]
    if isinstance(value, list) and all(
        isinstance(triple, list) and len(triple) == 3 and all(isinstance(part, str) for part in triple)
        for triple in value
    ):
        return value
    raise PipelineError(f"{where}: expected a list of [head, relation, tail] or an answer string")


def read_rows(path: str) -> list[dict]:
    file = Path(path)
    if file.suffix in (".csv", ".tsv"):
        if not file.is_file():
            raise PipelineError(f"{path}: file not found")
        with file.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle, delimiter="," if file.suffix == ".csv" else "\t"))
    return read_jsonl(path)


def add_rows(graph: Graph, rows: list[dict], column: str, path: str, kind: str = "") -> None:
    for number, row in enumerate(rows, start=1):
        if column not in row:
            raise PipelineError(f"{path}: row {number} has no column {column!r}; choose one with --column")
        sentence = row.get("sentence") or row.get("text") or ""
        sentence_id = row.get("id") or str(number)
        for triple in triples_in(row[column], f"{path}: row {number}, column {column!r}"):
            graph.add(triple, sentence_id, sentence, kind)


def default_column(rows: list[dict]) -> str:
    """extract's ``triples``, else the fine-tuned student's answers in data/predictions.jsonl."""
    for column in ("triples", "finetuned"):
        if rows and column in rows[0]:
            return column
    raise PipelineError("no triples or finetuned column; choose the column with --column")


def run(args: argparse.Namespace) -> None:
    rows = read_rows(args.input)
    if not rows:
        raise PipelineError(f"{args.input}: no records; nothing to draw")
    column = args.column or default_column(rows)
    graph = Graph()
    add_rows(graph, rows, column, args.input)
    stem = Path(args.output)
    write_graphml(graph, stem.with_suffix(".graphml"))
    write_html(graph, stem.with_suffix(".html"), args.title or f"{Path(args.input).name}: {column}")
    print(
        f"{len(graph.nodes)} entities, {len(graph.edges)} relations: "
        f"{stem.with_suffix('.graphml')} and {stem.with_suffix('.html')}",
        file=sys.stderr,
    )


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "graph", help="draw triples as a knowledge graph (GraphML and an offline HTML page)", description=__doc__
    )
    parser.add_argument("input", help="extract's output (.jsonl, .csv, .tsv) or data/predictions.jsonl")
    parser.add_argument("--column", help="the field holding triples or answers (default: triples, else finetuned)")
    parser.add_argument("--output", "-o", default="graph", help="writes OUTPUT.graphml and OUTPUT.html")
    parser.add_argument("--title", help="the page's title")
    parser.set_defaults(run=run)
