"""Benchmark the synthesize stage against the post's labelling loop, on a loopback provider with real limits.

The runs go at once, each against its own FakeProvider (tests/fake_provider.py) with 300-800 ms latency, each
labelling the same sentences (`--runs` picks some):

  post           the post's loop: one request at a time with the groq SDK, a 10 s sleep after every 10
                 (limits of 300 requests/min and 60,000 tokens/min)
  stage          `python stages/synthesize.py` with teacher.limits set to the provider's (the same limits)
  faults         the same stage while 30% of requests fail (500, 503, timeouts, dropped connections, malformed JSON,
                 empty choices)
  count_more     the stage against a provider whose limit is 10,000 tokens/min and that counts 10% more tokens
                 than the stage's estimate (characters / 4): the token limit binds
  count_less     the same, counting 10% less
  template       the same, counting characters / 4 and 4 tokens a message (a chat template's overhead), as the
                 issue's server did (about 4% more than the estimate)
  junk           the stage while 22% of answers are junk (no triple, empty, null content, cut at max_tokens, a
                 120 KB ramble, control characters) or malformed bodies with status 200, teacher.reask 2; then the
                 stage again in the same project, as a second `dvc repro` would run it

    python bench/synthesis.py --sentences 2000 --out bench-synthesis.json
    python bench/synthesis.py --runs count_more,count_less,junk --sentences 400 --out bench-synthesis.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import groq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_provider import JUNK_ANSWERS, MALFORMED_BODIES, FakeProvider, count_characters  # noqa: E402

from redistill.io import write_jsonl  # noqa: E402
from redistill.prompts import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from redistill.sentences import sentence_id  # noqa: E402

MODEL = "openai/gpt-oss-120b"
LIMITS = {"rpm": 300, "tpm": 60_000}
TOKEN_LIMITS = {"rpm": 300, "tpm": 10_000}  # the miscounting providers': tokens per minute bind
LATENCY = (0.3, 0.8)
MINUTE = 60.0
FAULT_MIX = {"500": 0.06, "503": 0.06, "timeout": 0.05, "drop": 0.05, "malformed_json": 0.04, "empty_choices": 0.04}
JUNK_MIX = {fault: 0.02 for fault in (*MALFORMED_BODIES, *JUNK_ANSWERS)}


def sentences(count: int) -> list[dict]:
    cities = ["Paris", "Leeds", "Rome", "Vienna", "Oslo", "Lima", "Cairo", "Quito", "Perth", "Accra"]
    texts = [f"Company {i} was founded in {cities[i % 10]} in {1800 + i % 200} by Person {i}." for i in range(count)]
    return [{"id": sentence_id(text), "text": text} for text in texts]


def provider(faults: dict | None = None, seed: int = 0, limits: dict = LIMITS, **counting) -> FakeProvider:
    return FakeProvider(
        models=(MODEL,), latency=LATENCY, rpm_limit=limits["rpm"], tpm_limit=limits["tpm"], rpd_limit=14_400,
        faults=faults or {}, hang_seconds=20.0, seed=seed, **counting,
    )  # fmt: skip


def post_loop(server: FakeProvider, rows: list[dict]) -> dict:
    """The notebook's loop: sequential requests, `time.sleep(10)` after every 10."""
    client = groq.Groq(api_key=server.api_key, base_url=server.url)
    started = time.monotonic()
    for index, row in enumerate(rows):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": row["text"]}],
            temperature=0.5,
            max_tokens=128,
            top_p=1,
            stream=False,
            stop=None,
        )
        if (index + 1) % 10 == 0:
            time.sleep(10)
    return {"seconds": time.monotonic() - started, "labelled": len(server.completed_texts)}


def stage(server: FakeProvider, rows: list[dict], concurrency: int, timeout: float, **teacher) -> dict:
    """The synthesize stage as `dvc repro` runs it, in a project of its own; with ``rerun``, run it a second time
    there and count what that run sent."""
    rerun = teacher.pop("rerun", False)
    limits = teacher.pop("limits", LIMITS)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["teacher"].update(
            provider="groq", model=MODEL, base_url=server.url, concurrency=concurrency, timeout=timeout,
            limits={"rpm": limits["rpm"], "tpm": limits["tpm"], "rpd": None}, max_retries=8, **teacher,
        )  # fmt: skip
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        write_jsonl(work / "data/sentences.jsonl", rows)
        env = {**os.environ, "GROQ_API_KEY": server.api_key}
        command = [sys.executable, str(ROOT / "stages/synthesize.py")]
        started = time.monotonic()
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if result.returncode != 0:
            return {"seconds": seconds, "error": result.stderr.strip().splitlines()[-1]}
        metrics = json.loads((work / "metrics/synthesize.json").read_text())
        labelled = (work / "data/labeled.jsonl").read_text().splitlines()
        run = {"seconds": seconds, "labelled": len(labelled), "metrics": metrics}
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        run.update(warnings=warnings, unusable_rows=sum('"unusable"' in line for line in labelled))
        if rerun:
            journal = (work / "data/teacher_journal.jsonl").read_text().splitlines()
            run["journal_answers_not_text"] = sum(
                not isinstance(entry.get("answer", ""), str) for entry in map(json.loads, journal)
            )
            attempts = server.attempts
            again = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
            run["rerun"] = {"returncode": again.returncode, "requests_received": server.attempts - attempts}
    return run


def window_fill(server: FakeProvider, limits: dict) -> dict:
    """How full the provider's one-minute windows were, on average, from the first admission to a minute before
    the last (every whole window of the run, one a second): of the token and of the request limit. A perfect
    pacer fills the binding one to 1.0, less the room a last request does not fit in."""
    accepted = list(server.accepted)
    if len(accepted) < 2 or accepted[-1][0] - accepted[0][0] < MINUTE:
        return {}
    first, last = accepted[0][0], accepted[-1][0]
    starts = [first + second for second in range(int(last - first - MINUTE) + 1)]
    tokens, requests = [], []
    for start in starts:
        inside = [count for stamp, count in accepted if start <= stamp < start + MINUTE]
        tokens.append(sum(inside) / limits["tpm"])
        requests.append(len(inside) / limits["rpm"])
    return {
        "windows": len(starts),
        "token_window_fill": round(sum(tokens) / len(tokens), 3),
        "request_window_fill": round(sum(requests) / len(requests), 3),
    }


def summary(name: str, run: dict, server: FakeProvider, sentences_count: int, limits: dict = LIMITS) -> dict:
    admitted = [stamp for stamp, _ in server.accepted]
    span = (admitted[-1] - admitted[0]) if len(admitted) > 1 else 0.0
    return {
        "run": name,
        "wall_seconds": round(run["seconds"], 1),
        "sentences_labelled": run.get("labelled"),
        "sentences": sentences_count,
        "requests_admitted": len(admitted),
        "http_429": server.status_counts.get(429, 0),
        "http_429_share": round(server.status_counts.get(429, 0) / max(server.attempts, 1), 4),
        "requests_per_minute": round(len(admitted) / run["seconds"] * 60, 1),
        "requests_per_minute_first_to_last": round((len(admitted) - 1) / span * 60, 1) if span else None,
        "share_of_rpm_limit": round(len(admitted) / run["seconds"] * 60 / limits["rpm"], 3),
        **window_fill(server, limits),
        "faults": {k: v for k, v in server.status_counts.items() if k != 200},
        **{key: run[key] for key in ("warnings", "unusable_rows", "journal_answers_not_text", "rerun") if key in run},
        **({"stage_metrics": run["metrics"]} if "metrics" in run else {}),
        **({"error": run["error"]} if "error" in run else {}),
    }


@dataclass(frozen=True)
class Run:
    title: str
    provider: dict = field(default_factory=dict)  # FakeProvider options beyond the shared ones
    teacher: dict | None = field(default_factory=dict)  # teacher.* for the stage; None: the post's loop instead
    limits: dict = field(default_factory=lambda: LIMITS)
    timeout: float = 10.0
    rerun: bool = False  # run the stage a second time in its project


RUNS = {
    "post": Run("post's loop", teacher=None),
    "stage": Run("stage"),
    "faults": Run("stage, 30% faults", {"faults": FAULT_MIX, "seed": 1}, timeout=5.0),
    "count_more": Run("stage, provider counts 10% more", {"tokenizer": count_characters(1.1)}, limits=TOKEN_LIMITS),
    "count_less": Run("stage, provider counts 10% less", {"tokenizer": count_characters(0.9)}, limits=TOKEN_LIMITS),
    "template": Run(
        "stage, provider adds 4 tokens a message",
        {"tokenizer": count_characters(), "message_tokens": 4},
        limits=TOKEN_LIMITS,
    ),
    "junk": Run("stage, 22% junk or malformed answers", {"faults": JUNK_MIX, "seed": 2}, {"reask": 2}, rerun=True),
}


def execute(run: Run, rows: list[dict], concurrency: int) -> dict:
    """One run against a provider of its own, summarised."""
    with provider(limits=run.limits, **run.provider) as server:
        if run.teacher is None:
            result = post_loop(server, rows)
        else:
            teacher = {**run.teacher, "limits": run.limits, "rerun": run.rerun}
            result = stage(server, rows, concurrency, run.timeout, **teacher)
        return summary(run.title, result, server, len(rows), run.limits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    rows = sentences(args.sentences)
    results: dict[str, dict] = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, execute(RUNS[n], rows, args.concurrency)))
        for n in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    if "stage" in results and "post" in results:
        results["stage_vs_post_throughput"] = round(
            results["stage"]["requests_per_minute"] / results["post"]["requests_per_minute"], 1
        )
    results["setup"] = {
        "latency_seconds": LATENCY,
        "limits": LIMITS,
        "token_limits": TOKEN_LIMITS,
        "fault_mix": FAULT_MIX,
        "junk_mix": JUNK_MIX,
        "cpu_count": os.cpu_count(),
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
