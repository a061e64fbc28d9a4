"""`redistill extract`: the trained student reads text and writes its triples, one record per sentence.

Inputs are plain text (paragraphs cut into sentences), one sentence per line, or JSONL with a text field. The
output (JSONL, CSV or TSV) is appended to chunk by chunk, each chunk fsynced; a run that stops is continued by
running it again with the same output file: sentences already written are skipped, a torn last line is cut.
A sidecar `<output>.run.json` records what produced the output, so a different run never appends to it.
"""

import argparse
import csv
import io
import json
import os
import sys
from bisect import bisect_right
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from tqdm import tqdm

from redistill import paths
from redistill.errors import PipelineError
from redistill.io import jsonl_values, write_json
from redistill.prompts import DEFAULT_SYSTEM_PROMPT
from redistill.sentences import sentence_id, split_sentences
from redistill.student import StudentParams, load_model, load_tokenizer
from redistill.triples import clean_label

if TYPE_CHECKING:  # the generator imports torch, which `redistill score` does without
    from redistill.generation import Generation, Generator

INPUT_FORMATS = ("auto", "text", "lines", "jsonl")
OUTPUT_FORMATS = ("jsonl", "csv", "tsv")
DELIMITERS = {"csv": ",", "tsv": "\t"}
COLUMNS = ("id", "sentence", "source", "triples", "ended")
# Sentences per written chunk: long enough to sort into well-filled batches, short enough to lose little on a kill.
CHUNK_BATCHES = 8
MODEL_INFO = "redistill.json"  # what `redistill merge` writes beside a merged model: its system prompt


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


# The model


@dataclass(frozen=True)
class Extractor:
    model: object
    tokenizer: object
    system_prompt: str
    context: int  # tokens the model attends to: prompt plus answer must fit


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def trained_system_prompt(model: str) -> str:
    """The instruction the model was trained with: a merged model's own record, else the run that trained the
    project's adapter (dvc.lock, else params.yaml), else the default."""
    info = Path(model) / MODEL_INFO
    if info.is_file():
        return json.loads(info.read_text())["system_prompt"]
    for source, read in ((Path("dvc.lock"), _locked_train_params), (paths.PARAMS, yaml.safe_load)):
        if source.is_file():
            params = read(source.read_text()) or {}
            teacher = params.get("teacher.system_prompt", (params.get("teacher") or {}).get("system_prompt"))
            return (params.get("student") or {}).get("system_prompt") or teacher or DEFAULT_SYSTEM_PROMPT
    return DEFAULT_SYSTEM_PROMPT


def _locked_train_params(text: str) -> dict:
    return ((yaml.safe_load(text) or {}).get("stages", {}).get("train", {}).get("params") or {}).get("params.yaml", {})


def load_extractor(
    model: str, base: str | None, quantization: str, device: str, merge: bool = True, dtype: object = None
) -> Extractor:
    """A model that answers: an adapter on its base (merged in memory unless 4-bit), a merged folder, or a hub id.
    ``dtype`` defaults to bfloat16 on a GPU and float32 on the CPU; "auto" keeps the stored one."""
    import torch

    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    folder = Path(model)
    if folder == paths.ADAPTER and not folder.exists():
        raise PipelineError(f"no adapter at {model}: run `make demo` or `dvc repro` first, or pass --model")
    student = StudentParams(model, system_prompt=None, chat_template_fallback="chatml", attn_implementation="sdpa")
    if is_adapter(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        base = base or config.get("base_model_name_or_path")
        if not base:
            raise PipelineError(f"{model}: adapter_config.json names no base model; pass --base")
        loaded = load_adapter(StudentParams(**{**asdict(student), "model": base}), folder, dtype, device, quantization)
        if merge and quantization == "none":
            loaded = loaded.merge_and_unload()
        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(student, source=str(folder) if has_tokenizer else base)
    else:
        if base:
            raise PipelineError(f"--base applies to adapters only, and {model} is a whole model")
        loaded = load_model(student, dtype, device, quantization)
        tokenizer = load_tokenizer(student)
    loaded.eval()
    context = getattr(loaded.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return Extractor(loaded, tokenizer, trained_system_prompt(model), context)


def load_adapter(base: StudentParams, adapter: Path, dtype, device: str, quantization: str):
    """The base model with the adapter applied; an adapter trained on another base is one clear line."""
    from peft import PeftModel

    model = load_model(base, dtype, device, quantization)
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "size mismatch" in line), lines[0])[:200]
        raise PipelineError(
            f"the adapter {adapter} does not fit the base model {base.model} ({reason}); "
            "pass the base it was trained on with --base"
        ) from None


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
        earlier = json.loads(self.sidecar.read_text())
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
    import torch

    from redistill.generation import Generator

    if (args.batch_size is not None and args.batch_size < 1) or args.max_new_tokens < 1:
        raise PipelineError("--batch-size and --max-new-tokens must be positive")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (256 if device.startswith("cuda") else 32)
    sentences = read_inputs(args.inputs, args.input_format, args.field)
    run = {
        "model": args.model,
        "base": args.base,
        "system_prompt": args.system_prompt,
        "quantization": args.quantization,
        "max_new_tokens": args.max_new_tokens,
    }
    output = Output(args.output, output_format(args.output, args.format), run)
    pending = [sentence for sentence in sentences if sentence.key not in output.done]
    if not pending:
        print(f"all {len(sentences)} sentences are already in {args.output}", file=sys.stderr)
        return
    extractor = load_extractor(args.model, args.base, args.quantization, device)
    generator = Generator(
        extractor.model,
        extractor.tokenizer,
        args.system_prompt or extractor.system_prompt,
        args.max_new_tokens,
        batch_size,
    )
    fitting = fit_context(pending, generator, extractor.context - args.max_new_tokens)
    written = 0
    with tqdm(total=len(fitting), desc="extract", unit="sentence", file=sys.stderr) as bar:
        for start in range(0, len(fitting), batch_size * CHUNK_BATCHES):
            chunk = fitting[start : start + batch_size * CHUNK_BATCHES]
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
    parser.add_argument("--batch-size", type=int, help="sentences per batch (default 256 on GPU, 32 on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.set_defaults(run=extract)
