"""Benchmark inference on the Llama-3-8B architecture (random weights): the post's way against `redistill extract`.

In one process on one GPU, on the same sentences, each with a fixed number of new tokens:
- the post's way: a transformers pipeline over the merged model, one sentence at a time;
- the generator evaluate used before this benchmark (``--before FILE``, that version of redistill/generation.py);
- redistill's generator on the adapter merged in memory (what `redistill extract --model ADAPTER` runs), at several
  batch sizes; on the adapter left unmerged; on the folder `redistill merge` wrote;
- `redistill extract` end to end on the merged folder (reading the input, writing JSONL), load time apart;
- a torch.profiler table of the fastest path's run;
- with ``--decodings``, the generator at the fastest batch size under each named decoding setting (structured,
  samples, beams: bench/decoding.py's SETTINGS), its batch counted in rows as evaluate.batch_size.

Random weights never emit EOS, so every answer runs to ``--new-tokens``: real answers stop earlier, and finished rows
leave the batch, so real runs are faster than these. Llama-3-8B's weights can't be downloaded here; the model is built
from its published config (bench/common.py), and the tokenizer is any with similar English compression.

    python bench/extract.py --tokenizer DIR --data FILE --out results.json
"""

import argparse
import importlib.util
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_random_llama3_8b
from decoding import SETTINGS

from redistill.cli import main as redistill
from redistill.generation import Generator, prompt_batches
from redistill.io import read_records, write_json
from redistill.merging import merge
from redistill.models import load_trained, write_trained_with
from redistill.prompts import CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT


def make_adapter(base: Path, folder: Path, rank: int) -> None:
    """A LoRA adapter with random (non-zero) weights on every projection, as the train stage's defaults."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": "cuda"})
    config = LoraConfig(
        r=rank,
        lora_alpha=rank // 2,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    get_peft_model(model, config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHATML_TEMPLATE  # what the train stage saves: the ChatML fallback
    tokenizer.save_pretrained(folder)
    write_trained_with(folder, str(base), DEFAULT_SYSTEM_PROMPT)
    del model
    torch.cuda.empty_cache()


def timed(function) -> tuple[object, float]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = function()
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def generator_run(
    name,
    model,
    tokenizer,
    texts: list[str],
    new_tokens: int,
    batch_size: int,
    static=None,
    decoding=None,
    profile_to: Path | None = None,
    **options,
) -> dict:
    """``static``: None is the default (CUDA graphs on a GPU), False the growing cache that drops finished rows;
    ``options`` go to the Generator (``continuous``). ``profile_to``: a torch.profiler table of the timed run."""
    decoding = decoding or SETTINGS["greedy"]
    generator = Generator(
        model, tokenizer, DEFAULT_SYSTEM_PROMPT, new_tokens, batch_size, static=static, decoding=decoding, **options
    )
    generator.generate(warm_up_texts(generator, texts), progress=False)  # kernels, graph capture
    torch.cuda.reset_peak_memory_stats()
    with profiled(profile_to):
        outputs, seconds = timed(lambda: generator.generate(texts, progress=False))
    row = report(name, len(texts), seconds, sum(o.new_tokens for o in outputs), batch_size=batch_size)
    return row | {"answers": [output.text for output in outputs], "lengths": [o.new_tokens for o in outputs]}


def warm_up_texts(generator: Generator, texts: list[str]) -> list[str]:
    """The longest of ``texts``, as many as the timed run's largest batch: the warm-up builds (and captures the
    graph of) the static cache of the timed run's size and length, so no capture falls inside the timed run."""
    lengths = [len(generator.prompt_ids(text)) for text in texts]
    rows = max(map(len, prompt_batches(lengths, generator.sentences_per_batch)))
    longest = sorted(range(len(texts)), key=lambda index: lengths[index])[-rows:]
    return [texts[index] for index in longest]


@contextmanager
def profiled(out: Path | None):
    """torch.profiler around the block, its kernel table (by GPU time) written to ``out``; nothing if None."""
    if out is None:
        yield
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    started = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    events = prof.key_averages()
    busy = sum(event.self_device_time_total for event in events) / 1e6
    summary = f"{seconds:.2f} s wall (profiled), {busy:.2f} s of GPU kernels"
    table = events.table(sort_by="self_cuda_time_total", row_limit=30)
    # the same by operator and input shapes: which call of an operator (e.g. which batched product) takes the time
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=40)
    out.write_text(summary + "\n" + table + "\n\nBy operator and input shapes:\n" + shapes)
    print(summary, flush=True)
    print(table[:8000], flush=True)


def report(name: str, sentences: int, seconds: float, new_tokens: int, **extra) -> dict:
    """One run's numbers, printed as they come; the answers (for comparing paths) are kept out of the output file."""
    row = {
        "run": name,
        "sentences": sentences,
        "seconds": round(seconds, 2),
        "sentences_per_second": round(sentences / seconds, 2),
        "new_tokens_per_second": round(new_tokens / seconds),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def save(path: str, results: dict) -> None:
    runs = [{key: value for key, value in run.items() if key not in ("answers", "lengths")} for run in results["runs"]]
    write_json(path, results | {"runs": runs})


def post_way(model, tokenizer, texts: list[str], new_tokens: int) -> dict:
    """The post's loop: a text-generation pipeline, one sentence at a time, sampling as the post did."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for text in texts
    ]
    options = {"max_new_tokens": new_tokens, "do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.95}
    pipe(prompts[0], **options, pad_token_id=tokenizer.pad_token_id)  # warm-up
    _, seconds = timed(lambda: [pipe(prompt, **options, pad_token_id=tokenizer.pad_token_id) for prompt in prompts])
    return report("the post's way (pipeline, one sentence at a time)", len(texts), seconds, len(texts) * new_tokens)


def before_run(path: str, model, tokenizer, texts: list[str], new_tokens: int, batch_size: int) -> dict:
    """The generator evaluate used before (transformers' generate, left padding), loaded from ``path``."""
    spec = importlib.util.spec_from_file_location("generation_before", path)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    before.generate(model, tokenizer, texts[:batch_size], DEFAULT_SYSTEM_PROMPT, new_tokens, batch_size)
    outputs, seconds = timed(
        lambda: before.generate(model, tokenizer, texts, DEFAULT_SYSTEM_PROMPT, new_tokens, batch_size)
    )
    name = f"before: transformers generate, batch {batch_size}"
    return report(name, len(texts), seconds, sum(o.new_tokens for o in outputs), batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="a JSON(L) file of records with a text field")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="256,512,1024")
    parser.add_argument("--post-sentences", type=int, default=16)
    parser.add_argument("--before", help="an earlier redistill/generation.py to time as the starting point")
    parser.add_argument("--rank", type=int, default=256, help="LoRA rank (the train stage's default)")
    parser.add_argument("--decodings", help="comma-separated names of bench/decoding.py's SETTINGS to time too")
    parser.add_argument("--work", default="bench-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    work = Path(args.work).resolve()
    texts = [record["text"] for record in read_records(args.data)]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "new_tokens": args.new_tokens}
    results["runs"] = runs = []
    base, adapter, merged = work / "llama3-8b-random", work / "adapter", work / "merged"
    results["build_seconds"] = build_random_llama3_8b(base, args.tokenizer)
    make_adapter(base, adapter, args.rank)
    sizes = [int(size) for size in args.batch_sizes.split(",")]

    extractor, load_seconds = timed(lambda: load_trained(str(adapter), device="cuda"))
    results["load_adapter_merged_seconds"] = round(load_seconds, 1)
    model, tokenizer = extractor.model, extractor.tokenizer
    runs.append(post_way(model, tokenizer, texts[: args.post_sentences], args.new_tokens))
    if args.before:
        runs.append(before_run(args.before, model, tokenizer, texts, args.new_tokens, 256))
    name = "adapter merged in memory, growing cache dropping finished rows, batch 256"
    runs.append(generator_run(name, model, tokenizer, texts, args.new_tokens, 256, static=False))
    for size in sizes:
        name = f"adapter merged in memory, static cache + CUDA graph, batch {size}"
        try:
            runs.append(generator_run(name, model, tokenizer, texts, args.new_tokens, size))
        except torch.OutOfMemoryError as error:  # one size failing leaves the others' numbers
            print(f"{name}: {error}", flush=True)
        save(args.out, results)
    best = max((run for run in runs if "graph" in run["run"]), key=lambda run: run["sentences_per_second"])
    growing = next(run for run in runs if "growing" in run["run"])
    same = sum(a == b for a, b in zip(growing["answers"], best["answers"], strict=True))
    results["graph_vs_growing_cache_identical_answers"] = f"{same}/{len(texts)}"
    print(f"identical answers, growing cache vs graph: {same}/{len(texts)}", flush=True)
    name = f"{best['run']}, profiled"
    profile_to = Path(args.out).with_suffix(".profile.txt")
    generator_run(name, model, tokenizer, texts, args.new_tokens, best["batch_size"], profile_to=profile_to)
    for setting in args.decodings.split(",") if args.decodings else []:
        name = f"adapter merged in memory, static cache + CUDA graph, batch {best['batch_size']} rows, {setting}"
        decoding = SETTINGS[setting]
        runs.append(
            generator_run(name, model, tokenizer, texts, args.new_tokens, best["batch_size"], decoding=decoding)
        )
        save(args.out, results)
    del model, extractor
    torch.cuda.empty_cache()

    extractor = load_trained(str(adapter), device="cuda", merge=False)
    name = f"adapter unmerged (LoRA layers live), static cache + CUDA graph, batch {best['batch_size']}"
    runs.append(generator_run(name, extractor.model, extractor.tokenizer, texts, args.new_tokens, best["batch_size"]))
    del extractor
    torch.cuda.empty_cache()
    save(args.out, results)

    _, results["merge_seconds"] = timed(lambda: merge(str(adapter), None, str(merged), "cuda"))
    extractor = load_trained(str(merged), device="cuda")
    name = f"merged folder, static cache + CUDA graph, batch {best['batch_size']}"
    runs.append(generator_run(name, extractor.model, extractor.tokenizer, texts, args.new_tokens, best["batch_size"]))
    del extractor
    torch.cuda.empty_cache()

    sentences = work / "sentences.txt"
    sentences.write_text("".join(text.replace("\n", " ") + "\n" for text in texts))
    command = [
        "extract",
        str(sentences),
        "--input-format",
        "lines",
        "--model",
        str(merged),
        "-o",
        str(work / "out.jsonl"),
    ]
    command += ["--max-new-tokens", str(args.new_tokens), "--batch-size", str(best["batch_size"])]
    _, seconds = timed(lambda: redistill(command))
    runs.append(report("`redistill extract` on the merged folder, end to end with loading", len(texts), seconds, 0))
    save(args.out, results)
    print(f"\n{results['device']}, {args.new_tokens} new tokens, {len(texts)} sentences")
    print_table(runs)


def print_table(runs: list[dict]) -> None:
    for run in runs:
        print(
            f"{run['sentences_per_second']:9.2f} sentences/s {run['seconds']:8.2f} s "
            f"{run['peak_gib']:5.1f} GiB  {run['run']}"
        )


if __name__ == "__main__":
    main()
