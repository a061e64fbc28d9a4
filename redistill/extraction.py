"""`redistill extract`: the trained student reads text and writes its triples, one record per sentence.

Inputs are plain text (paragraphs cut into sentences), one sentence per line, or JSONL with a text field. The
output (JSONL, CSV or TSV) is appended to chunk by chunk, each chunk fsynced; a run that stops is continued by
running it again with the same output file: sentences already written are skipped, a torn last line is cut.
A sidecar `<output>.run.json` records what produced the output, so a different run never appends to it.
"""

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from redistill import paths
from redistill.decoding import GREEDY, Decoding
from redistill.errors import PipelineError
from redistill.io import jsonl_values, write_json
from redistill.liger import liger_problem, use_liger_kernels
from redistill.sentences import sentence_id, split_sentences
from redistill.triples import clean_label

if TYPE_CHECKING:  # the generator imports torch, which `redistill score` does without
    from redistill.generation import Generation, Generator

INPUT_FORMATS = ("auto", "text", "lines", "jsonl")
OUTPUT_FORMATS = ("jsonl", "csv", "tsv")
DELIMITERS = {"csv": ",", "tsv": "\t"}
COLUMNS = ("id", "sentence", "source", "triples", "ended")
# Sentences per written chunk: long enough to sort into well-filled batches, short enough to lose little on a kill.
CHUNK_BATCHES = 8
# What a sidecar written before extract recorded its decoding means: greedy, as every run then decoded.
RUN_BEFORE_DECODING = {"decoding": GREEDY.settings()}


@dataclass(frozen=True)
class Sentence:
    id: str
    text: str
    source: str  # file:line

    @property
    def key(self) -> tuple[str, str]:
        return self.id, self.source


# Reading inputs


def read_text(path: str) -> tuple[str, str]:
    """(name, text) of a file, or of stdin for "-"; binary and non-UTF-8 input is refused with one line."""
    name = "<stdin>" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read()
    elif not Path(path).is_file():
        raise PipelineError(f"{path}: file not found")
    else:
        data = Path(path).read_bytes()
    if b"\0" in data[:65536]:
        raise PipelineError(f"{name}: looks like a binary file (it holds NUL bytes); give a text or JSONL file")
    try:
        return name, data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PipelineError(
            f"{name}: not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
            f"convert it first, e.g. iconv -f LATIN1 -t UTF-8"
        ) from None


def input_format(name: str, requested: str) -> str:
    if requested != "auto":
        return requested
    return "jsonl" if name.endswith(".jsonl") else "text"


def sentences_of(name: str, text: str, form: str, field: str) -> list[Sentence]:
    """The sentences of one input, each with the line it starts on."""
    found = []
    if form == "jsonl":
        for number, record in jsonl_values(text, name, hint="is it JSONL?"):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise PipelineError(f"{name}:{number}: no string field {field!r}; choose the text field with --field")
            found += [(number, sentence) for _, sentence in split_sentences(record[field])]
    elif form == "lines":
        found = [(number, " ".join(line.split())) for number, line in enumerate(text.splitlines(), start=1)]
    else:  # paragraphs, separated by blank lines, may wrap over lines and hold many sentences
        starts = [0] + [index + 1 for index, char in enumerate(text) if char == "\n"]
        for offset, sentence in split_sentences(text):
            found.append((_line_of(starts, offset), sentence))
    return [Sentence(sentence_id(sentence), sentence, f"{name}:{number}") for number, sentence in found if sentence]


def _line_of(line_starts: list[int], offset: int) -> int:
    return bisect_right(line_starts, offset)


def read_inputs(inputs: list[str], form: str, field: str) -> list[Sentence]:
    sentences = []
    for path in inputs or ["-"]:
        name, text = read_text(path)
        sentences += sentences_of(name, text, input_format(name, form), field)
    if not sentences:
        raise PipelineError(f"no sentences in {', '.join(inputs or ['<stdin>'])}: the input is empty")
    return sentences


# The output


def triples_of(generation: "Generation") -> list[list[str]]:
    return [list(triple) for triple in clean_label(generation.text).triples]


def format_records(records: list[dict], form: str) -> str:
    if form == "jsonl":
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=DELIMITERS[form], lineterminator="\n")
    for record in records:
        writer.writerow([*(record[column] for column in COLUMNS[:3]), json.dumps(record["triples"]), record["ended"]])
    return buffer.getvalue()


def output_format(path: str | None, requested: str | None) -> str:
    if requested:
        return requested
    suffix = Path(path).suffix.lstrip(".") if path else ""
    return suffix if suffix in OUTPUT_FORMATS else "jsonl"


class Output:
    """Where records go: stdout, or a file appended to chunk by chunk that a re-run of the same run continues."""

    def __init__(self, path: str | None, form: str, run: dict):
        self.path, self.form, self.run = (Path(path) if path else None), form, run
        self.done: set[tuple[str, str]] = set()
        self.started = self.path is not None and self.path.exists() and self.path.stat().st_size > 0
        if self.path is None:
            return
        self.sidecar = self.path.with_name(self.path.name + ".run.json")
        if self.started:
            self._check_same_run(run)
            self._cut_torn_line()
            self.done = self._written_keys()

    def _check_same_run(self, run: dict) -> None:
        if not self.sidecar.is_file():
            raise PipelineError(
                f"{self.path} exists and is not a redistill extract output (no {self.sidecar.name}); "
                "choose another --output or remove it"
            )
        earlier = RUN_BEFORE_DECODING | json.loads(self.sidecar.read_text())
        changed = [key for key in run if earlier.get(key) != run[key]]
        if changed:
            raise PipelineError(
                f"{self.path} was written by another run (its {', '.join(changed)} differ); "
                "choose another --output, or remove it to start over"
            )

    def _cut_torn_line(self) -> None:
        """A run killed mid-write leaves a last line without its newline: drop it, it is written again."""
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def _written_keys(self) -> set[tuple[str, str]]:
        text = self.path.read_text(encoding="utf-8")
        if self.form == "jsonl":
            rows = [row for _, row in jsonl_values(text, str(self.path))]
        else:
            rows = list(csv.DictReader(io.StringIO(text), delimiter=DELIMITERS[self.form]))
        return {(row["id"], row["source"]) for row in rows}

    def write(self, records: list[dict]) -> None:
        text = format_records(records, self.form)
        if self.path is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        if not self.started:  # created only once there is a record to write: a failed start leaves no file
            write_json(self.sidecar, self.run)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = format_header(self.form) + text
            self.started = True
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def format_header(form: str) -> str:
    return "" if form == "jsonl" else DELIMITERS[form].join(COLUMNS) + "\n"


# The command


def extract(args: argparse.Namespace) -> None:
    from redistill.generation import Generator
    from redistill.models import load_trained, pick_device

    if (args.batch_size is not None and args.batch_size < 1) or args.max_new_tokens < 1:
        raise PipelineError("--batch-size and --max-new-tokens must be positive")
    decoding = decoding_of(args)
    device = pick_device(args.device)
    batch_size = args.batch_size or (256 if device.startswith("cuda") else 32)
    sentences = read_inputs(args.inputs, args.input_format, args.field)
    run = {
        "model": args.model,
        "base": args.base,
        "system_prompt": args.system_prompt,
        "quantization": args.quantization,
        "max_new_tokens": args.max_new_tokens,
        "decoding": decoding.settings(),
    }
    output = Output(args.output, output_format(args.output, args.format), run)
    pending = [sentence for sentence in sentences if sentence.key not in output.done]
    if not pending:
        print(f"all {len(sentences)} sentences are already in {args.output}", file=sys.stderr)
        return
    if Path(args.model) == paths.ADAPTER and not paths.ADAPTER.exists():
        raise PipelineError(f"no adapter at {args.model}: run `make demo` or `dvc repro` first, or pass --model")
    if args.liger_kernels and (problem := liger_problem("--liger-kernels")):
        raise PipelineError(problem)
    extractor = load_trained(args.model, args.base, device, quantization=args.quantization)
    if args.liger_kernels:
        use_liger_kernels(extractor.model)
    generator = Generator(
        extractor.model,
        extractor.tokenizer,
        args.system_prompt or extractor.system_prompt,
        args.max_new_tokens,
        batch_size,
        decoding=decoding,
        continuous=args.continuous_batching,
        live_column_attention=args.live_column_attention,
    )
    fitting = fit_context(pending, generator, extractor.context - args.max_new_tokens)
    written, chunk_size = 0, generator.sentences_per_batch * CHUNK_BATCHES
    with tqdm(total=len(fitting), desc="extract", unit="sentence", file=sys.stderr) as bar:
        for start in range(0, len(fitting), chunk_size):
            chunk = fitting[start : start + chunk_size]
            generations = generator.generate([sentence.text for sentence in chunk], progress=False)
            output.write([record(sentence, answer) for sentence, answer in zip(chunk, generations, strict=True)])
            written += len(chunk)
            bar.update(len(chunk))
    skipped = len(pending) - len(fitting)
    done = len(sentences) - len(pending)
    print(
        f"extracted {written} sentences"
        + (f", {done} were already done" if done else "")
        + (f", skipped {skipped} too long for the model's context" if skipped else ""),
        file=sys.stderr,
    )


def fit_context(sentences: list[Sentence], generator: "Generator", room: int) -> list[Sentence]:
    """The sentences whose prompt leaves room for the answer; each one that doesn't is a warning, not a crash."""
    fitting = []
    for sentence in sentences:
        length = len(generator.prompt_ids(sentence.text))
        if length > room:
            print(
                f"warning: {sentence.source}: a sentence of {length} prompt tokens leaves no room for "
                f"{generator.max_new_tokens} new tokens in the model's context; skipped",
                file=sys.stderr,
            )
        else:
            fitting.append(sentence)
    return fitting


def record(sentence: Sentence, generation: "Generation") -> dict:
    return {
        "id": sentence.id,
        "sentence": sentence.text,
        "source": sentence.source,
        "triples": triples_of(generation),
        "ended": generation.ended,
    }


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """One option per decoding setting, its default and help from its declaration (evaluate.decoding's too)."""
    group = parser.add_argument_group("decoding", "how each answer is decoded (default: greedy)")
    for field in dataclasses.fields(Decoding):
        help_text = field.metadata["help"].replace("`", "").replace("%", "%%") + "; default: %(default)s"
        if field.type is bool:
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": field.type, "metavar": field.type.__name__.upper()}
        group.add_argument(option(field.name), default=field.default, help=help_text, **kind)


def decoding_of(args: argparse.Namespace) -> Decoding:
    decoding = Decoding(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Decoding)})
    error = decoding.error(option)
    if error is not None:
        raise PipelineError(error)
    return decoding


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "extract", help="extract triples from text with the trained student", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("inputs", nargs="*", help="text, one-sentence-per-line or JSONL files; none or - for stdin")
    parser.add_argument("--model", default=str(paths.ADAPTER), help="adapter folder, merged model folder or hub id")
    parser.add_argument("--base", help="the adapter's base model (default: the one its adapter_config.json names)")
    parser.add_argument(
        "--input-format", choices=INPUT_FORMATS, default="auto", help="auto: .jsonl is JSONL, else text"
    )
    parser.add_argument("--field", default="text", help="the text field of JSONL input")
    parser.add_argument("--output", "-o", help="output file (default: stdout); re-running continues it")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, help="default: from the output's suffix, else jsonl")
    parser.add_argument("--system-prompt", help="default: the instruction the model was trained with")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none", help="nf4: 4-bit (GPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="answers decoded together (default 256 on GPU, 32 on CPU); a sentence takes "
        "--samples or --num-beams of them",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--continuous-batching",
        action="store_true",
        help="GPU: rows that finish take the next sentence (the same greedy answers; not with --num-beams)",
    )
    parser.add_argument(
        "--live-column-attention",
        action="store_true",
        help="GPU: each decoding step reads only each row's own columns and the system prompt (the same answers up "
        "to rounding)",
    )
    parser.add_argument(
        "--liger-kernels",
        action="store_true",
        help="GPU: Liger's fused norm, SwiGLU and rotary kernels in the model (requirements-gpu.txt; the same "
        "answers up to rounding)",
    )
    add_decoding_options(parser)
    parser.set_defaults(run=extract)
