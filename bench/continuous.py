"""Benchmark continuous batching (issue 22) beside batch-by-batch decoding, in one GPU process.

On the Llama-3-8B architecture with random weights (bench/common.py), its folder given a chat template and the
default system prompt so that it loads as a merged student folder does:
- **to the cap**: the post's sentences, every answer ``--new-tokens`` long (random weights never say end of turn),
  batch by batch (today's path) and continuously batched, at ``--batch-size``;
- **realistic lengths**: the same model, but each answer forced to end after as many tokens as a teacher's answer
  has. The model computes every step as before; a forward hook then overrides the chosen token only: the first
  answer token encodes a length drawn from the teacher answers' token lengths (picked by a hash of the sentence's
  tokens, so it is the same sentence's length on either path), each next token counts down, and the last is the
  end-of-turn token. That needs no knowledge of which row holds which sentence, so it is the same on both paths,
  and both paths' answers (so their lengths) are compared;
- **`redistill extract` end to end** (loading, reading, writing JSONL) on ``--extract-sentences`` sentences (the
  post's, repeated), to the cap, without and with ``--continuous-batching``;
- each of these once more with live-column attention (``--live-column-attention``: the step reads only each row's
  prefix and own columns, redistill/live_attention.py);
- with ``--liger``, to the cap once more, continuously batched (with live-column attention if its run was chosen),
  with Liger's fused kernels in the model.

Each pair (PAIRS) reports its speedup and how many answers are identical. ``--runs`` chooses the runs by name
(WAYS: ``cap``, ``cap-continuous``, ``cap-continuous-live``, ``extract-continuous-live``, ...), so that one GPU
call measures a baseline and its candidate side by side:

    python bench/continuous.py --tokenizer DIR --data sft_dataset.json --out continuous.json
    python bench/continuous.py ... --runs cap-continuous,cap-continuous-live --liger
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_random_llama3_8b, labelled_rows
from extract import generator_run, print_table, report, save, timed

from redistill import generation
from redistill.cli import main as redistill
from redistill.generation import ADMIT_ATTENTION
from redistill.models import load_trained, write_trained_with
from redistill.prompts import CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT, answer_text, stop_token_ids

EVERY_KERNEL = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
COUNTDOWN = 1000  # forced answers count down through tokens COUNTDOWN + 1 ...: plain word pieces in any 49k vocabulary


def answer_lengths(rows: list[dict], tokenizer) -> list[int]:
    """The token lengths of the teacher's answers, the end-of-turn token counted."""
    return [len(tokenizer(answer_text(row["triples"]), add_special_tokens=False)["input_ids"]) + 1 for row in rows]


def force_lengths(model, lengths: list[int], pad: int, stop: int):
    """A forward hook on ``model`` that ends each answer after a length drawn from ``lengths`` (see the module's
    docstring); graph-safe: tensor operations only. Returns the hook's handle."""
    table, longest = torch.tensor(lengths, device=model.device), max(lengths)  # no host sync in a graph's capture
    weights = torch.randint(1, 1 << 20, (4096,), generator=torch.Generator().manual_seed(0)).to(model.device)

    def hook(module, args, kwargs, output):
        input_ids = kwargs["input_ids"]
        logits = output.logits[:, -1]
        if input_ids.shape[1] > 1:  # a prefill: the sentence's own tokens, right-aligned, pads left out
            tokens = input_ids.flip(1)
            key = ((tokens != pad) * tokens * weights[: tokens.shape[1]]).sum(-1)
            length = table[key % len(table)]
            forced = torch.where(length > 1, COUNTDOWN + length - 1, stop)
        else:
            last = input_ids[:, 0]
            counting = (last > COUNTDOWN) & (last < COUNTDOWN + longest)
            forced = torch.where(counting, torch.where(last - 1 > COUNTDOWN, last - 1, stop), -1)
        chosen = torch.zeros_like(logits).scatter_(-1, forced.clamp(min=0)[:, None], 1e4)
        logits.copy_(torch.where((forced >= 0)[:, None], chosen, logits))
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


# How each workload is decoded, in the order the runs go: the suffix that names a run (`--runs cap-continuous-live`),
# what it is called, and the Generator's options (`redistill extract`'s flags for the end-to-end runs).
WAYS = {
    "": ("batch by batch", {}),
    "-continuous-free": ("continuous, admitted rows' attention kernel left to PyTorch", {"continuous": True}),
    "-continuous": ("continuous", {"continuous": True}),
    "-live": ("batch by batch, live-column attention", {"live_column_attention": True}),
    "-continuous-live": ("continuous, live-column attention", {"continuous": True, "live_column_attention": True}),
}
FLAGS = {"continuous": "--continuous-batching", "live_column_attention": "--live-column-attention"}
# (baseline, candidate, what the comparison is called after its workload's name): speedup and identical answers
PAIRS = [
    ("", "-continuous", ""),
    ("-continuous-free", "-continuous", ", admitted rows' kernel"),
    ("", "-live", ", live-column attention, batch by batch"),
    ("-continuous", "-continuous-live", ", live-column attention, continuous"),
]
WORKLOADS = ("cap", "realistic", "extract")
RUNS = [workload + way for workload in WORKLOADS for way in WAYS]


def switching(way: str) -> None:
    """The admitted rows' attention kernel of a run: left to PyTorch (cuDNN's, planned per shape, as before
    ADMIT_ATTENTION) in the "-free" runs, the generator's own in the others."""
    generation.ADMIT_ATTENTION = EVERY_KERNEL if way.endswith("-free") else ADMIT_ATTENTION


def pair(results: dict, label: str, before: dict, after: dict) -> None:
    same = sum(a == b for a, b in zip(before["answers"], after["answers"], strict=True))
    speedup = after["sentences_per_second"] / before["sentences_per_second"]
    results[label] = {"identical_answers": f"{same}/{len(before['answers'])}", "speedup": round(speedup, 2)}
    print(f"{label}: {results[label]}", flush=True)


def pairs(results: dict, workload: str, label: str, done: dict) -> None:
    """Every comparison of PAIRS whose two runs of ``workload`` ran."""
    for baseline, candidate, called in PAIRS:
        if workload + baseline in done and workload + candidate in done:
            pair(results, label + called, done[workload + baseline], done[workload + candidate])


def generator_runs(args, folder: Path, rows: list[dict], results: dict, done: dict) -> None:
    """The runs to the cap and at realistic lengths (and Liger's), on one loaded model."""
    texts = [row["text"] for row in rows]
    loaded, results["load_seconds"] = timed(lambda: load_trained(str(folder), device="cuda"))
    model, tokenizer = loaded.model, loaded.tokenizer
    size, cap = args.batch_size, args.new_tokens
    for workload, label, new_tokens, sentences, forced in (
        ("cap", "to the cap", cap, texts, False),
        ("realistic", "realistic lengths", args.realistic_new_tokens, (texts * 100)[: args.realistic_sentences], True),
    ):
        ways = [way for way in WAYS if workload + way in args.runs]
        if not sentences or not ways:  # --realistic-sentences 0, or none of its runs chosen
            continue
        handle = None
        if forced:
            lengths = answer_lengths(rows, tokenizer)
            results["answer_lengths"] = {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)}
            handle = force_lengths(model, lengths, tokenizer.pad_token_id, stop_token_ids(tokenizer)[0])
        name = f"{label}, {len(sentences)} sentences, {new_tokens} new tokens at most, batch {size}"
        for way in ways:
            what, options = WAYS[way]
            switching(way)
            try:
                run = generator_run(f"{name}: {what}", model, tokenizer, sentences, new_tokens, size, **options)
            except Exception as error:  # a candidate's failure (a kernel that won't compile) costs only its own run
                results.setdefault("failed", {})[workload + way] = repr(error)
                print(f"{workload + way} failed: {error!r}", flush=True)
                continue
            done[workload + way] = run
            results["runs"].append(run)
            save(args.out, results)
        switching("")
        pairs(results, workload, label, done)
        if forced:
            handle.remove()
            if finished := [done[workload + way] for way in ways if workload + way in done]:
                lengths = finished[0]["lengths"]
                results["realistic_mean_new_tokens"] = round(sum(lengths) / len(lengths), 1)
        save(args.out, results)
        if args.profile and not forced:  # apart from the timed runs: the profiler slows what it watches
            for way in ways:
                what, options = WAYS[way]
                profile_to = Path(args.out).with_suffix(f".profile-{workload}{way}.txt")
                switching(way)
                generator_run(
                    f"{name}: {what}, profiled",
                    model,
                    tokenizer,
                    sentences,
                    new_tokens,
                    size,
                    profile_to=profile_to,
                    **options,
                )
            switching("")
    if args.liger:  # the same run to the cap with Liger's fused norm, SwiGLU and rotary kernels in the model
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, {"cross_entropy": False, "fused_linear_cross_entropy": False})
        way = "-continuous-live" if "cap-continuous-live" in args.runs else "-continuous"  # the best chosen
        what, options = WAYS[way]
        name = f"to the cap, {len(texts)} sentences, {cap} new tokens at most, batch {size}: {what}, Liger kernels"
        liger = generator_run(name, model, tokenizer, texts, cap, size, **options)
        results["runs"].append(liger)
        if args.profile:  # apart from the timed run, as above
            profile_to = Path(args.out).with_suffix(".profile-liger.txt")
            generator_run(f"{name}, profiled", model, tokenizer, texts, cap, size, profile_to=profile_to, **options)
        if "cap" + way in done:
            pair(results, f"to the cap, Liger kernels ({what})", done["cap" + way], liger)
        save(args.out, results)
    del model, loaded
    torch.cuda.empty_cache()


def extract_runs(args, work: Path, folder: Path, texts: list[str], results: dict, done: dict) -> None:
    """`redistill extract` end to end on the post's sentences, repeated, to the cap: each chosen way's flags."""
    count = args.extract_sentences
    lines = work / "sentences.txt"
    lines.write_text("".join(text.replace("\n", " ") + "\n" for text in (texts * 100)[:count]))
    for way in (way for way in WAYS if "extract" + way in args.runs):
        output = work / f"out{way}.jsonl"
        output.unlink(missing_ok=True)
        Path(f"{output}.run.json").unlink(missing_ok=True)
        flags = [FLAGS[option] for option in WAYS[way][1]]
        command = ["extract", str(lines), "--input-format", "lines", "--model", str(folder), "-o", str(output)]
        command += ["--max-new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size), *flags]
        switching(way)
        torch.cuda.reset_peak_memory_stats()
        try:
            _, seconds = timed(lambda command=command: redistill(command))
        except (Exception, SystemExit) as error:  # the command's own error exits: this run alone is lost
            results.setdefault("failed", {})["extract" + way] = repr(error)
            print(f"extract{way} failed: {error!r}", flush=True)
            continue
        name = f"`redistill extract` end to end with loading, {count} sentences {' '.join(flags)}"
        done["extract" + way] = run = report(name, count, seconds, 0) | {"answers": output.read_text().splitlines()}
        results["runs"].append(run)
        save(args.out, results)
    switching("")
    pairs(results, "extract", "extract", done)
    save(args.out, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="the post's sft_dataset.json: records with text and gold_re")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--realistic-new-tokens", type=int, default=128, help="the cap of the realistic runs")
    parser.add_argument("--realistic-sentences", type=int, default=4096, help="the post's, repeated; 0: none")
    parser.add_argument("--extract-sentences", type=int, default=10_000, help="0: no end-to-end runs")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)} (default: all)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the runs to the cap")
    parser.add_argument("--liger", action="store_true", help="also to the cap with Liger's kernels (liger-kernel)")
    parser.add_argument("--work", default="bench-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.runs = args.runs.split(",")
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {', '.join(unknown)}; known: {', '.join(RUNS)}")

    work = Path(args.work).resolve()
    folder = work / "llama3-8b-random"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch_size": args.batch_size}
    results["build_seconds"] = build_random_llama3_8b(folder, args.tokenizer)
    base_tokenizer = AutoTokenizer.from_pretrained(folder)
    base_tokenizer.chat_template = CHATML_TEMPLATE  # the train stage's fallback, which `redistill merge` keeps
    base_tokenizer.save_pretrained(folder)
    write_trained_with(folder, str(folder), DEFAULT_SYSTEM_PROMPT)
    rows = labelled_rows(args.data)
    results["runs"] = []
    done = {}  # each run's row, by its name
    if args.liger or any(not run.startswith("extract") for run in args.runs):
        generator_runs(args, folder, rows, results, done)
    if args.extract_sentences:  # 0: skip the end-to-end runs
        extract_runs(args, work, folder, [row["text"] for row in rows], results, done)
    print(json.dumps({key: value for key, value in results.items() if key != "runs"}, indent=1))
    print_table(results["runs"])


if __name__ == "__main__":
    main()
