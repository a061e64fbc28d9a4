"""Benchmark the synthesize stage against the post's labelling loop, on a loopback provider with real limits.

Three runs at once, each against its own FakeProvider (tests/fake_provider.py) with 300-800 ms latency and
limits of 300 requests/min and 60,000 tokens/min, each labelling the same sentences:

  post      the post's loop: one request at a time with the groq SDK, a 10 s sleep after every 10
  stage     `python stages/synthesize.py` with teacher.limits set to the provider's limits
  faults    the same stage while 30% of requests fail (500, 503, timeouts, dropped connections, malformed JSON,
            empty choices)

    python bench/synthesis.py --sentences 2000 --out bench-synthesis.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import groq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_provider import FakeProvider  # noqa: E402

from redistill.io import write_jsonl  # noqa: E402
from redistill.prompts import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from redistill.sentences import sentence_id  # noqa: E402

MODEL = "openai/gpt-oss-120b"
LIMITS = {"rpm": 300, "tpm": 60_000}
LATENCY = (0.3, 0.8)
FAULT_MIX = {"500": 0.06, "503": 0.06, "timeout": 0.05, "drop": 0.05, "malformed_json": 0.04, "empty_choices": 0.04}


def sentences(count: int) -> list[dict]:
    cities = ["Paris", "Leeds", "Rome", "Vienna", "Oslo", "Lima", "Cairo", "Quito", "Perth", "Accra"]
    texts = [f"Company {i} was founded in {cities[i % 10]} in {1800 + i % 200} by Person {i}." for i in range(count)]
    return [{"id": sentence_id(text), "text": text} for text in texts]


def provider(faults: dict | None = None, seed: int = 0) -> FakeProvider:
    return FakeProvider(
        models=(MODEL,), latency=LATENCY, rpm_limit=LIMITS["rpm"], tpm_limit=LIMITS["tpm"], rpd_limit=14_400,
        faults=faults or {}, hang_seconds=20.0, seed=seed,
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


def stage(server: FakeProvider, rows: list[dict], concurrency: int, timeout: float) -> dict:
    """The synthesize stage as `dvc repro` runs it, in a project of its own."""
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["teacher"].update(
            provider="groq", model=MODEL, base_url=server.url, concurrency=concurrency, timeout=timeout,
            limits={"rpm": LIMITS["rpm"], "tpm": LIMITS["tpm"], "rpd": None}, max_retries=8,
        )  # fmt: skip
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        write_jsonl(work / "data/sentences.jsonl", rows)
        env = {**os.environ, "GROQ_API_KEY": server.api_key}
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(ROOT / "stages/synthesize.py")], cwd=work, env=env, capture_output=True, text=True
        )
        seconds = time.monotonic() - started
        if result.returncode != 0:
            return {"seconds": seconds, "error": result.stderr.strip().splitlines()[-1]}
        metrics = json.loads((work / "metrics/synthesize.json").read_text())
        labelled = sum(1 for _ in (work / "data/labeled.jsonl").open())
    return {"seconds": seconds, "labelled": labelled, "metrics": metrics}


def summary(name: str, run: dict, server: FakeProvider, sentences_count: int) -> dict:
    admitted = [stamp for stamp, _ in server.accepted]
    span = (admitted[-1] - admitted[0]) if len(admitted) > 1 else 0.0
    return {
        "run": name,
        "wall_seconds": round(run["seconds"], 1),
        "sentences_labelled": run.get("labelled"),
        "sentences": sentences_count,
        "requests_admitted": len(admitted),
        "http_429": server.status_counts.get(429, 0),
        "requests_per_minute": round(len(admitted) / run["seconds"] * 60, 1),
        "requests_per_minute_first_to_last": round((len(admitted) - 1) / span * 60, 1) if span else None,
        "share_of_rpm_limit": round(len(admitted) / run["seconds"] * 60 / LIMITS["rpm"], 3),
        "faults": {k: v for k, v in server.status_counts.items() if k != 200},
        **({"stage_metrics": run["metrics"]} if "metrics" in run else {}),
        **({"error": run["error"]} if "error" in run else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = sentences(args.sentences)
    results: dict[str, dict] = {}

    with provider() as post_server, provider() as stage_server, provider(FAULT_MIX, seed=1) as fault_server:
        jobs = {
            "post": lambda: summary("post's loop", post_loop(post_server, rows), post_server, len(rows)),
            "stage": lambda: summary(
                "stage", stage(stage_server, rows, args.concurrency, 10.0), stage_server, len(rows)
            ),
            "faults": lambda: summary(
                "stage, 30% faults", stage(fault_server, rows, args.concurrency, 5.0), fault_server, len(rows)
            ),
        }
        threads = [threading.Thread(target=lambda n=n, j=j: results.__setitem__(n, j())) for n, j in jobs.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    results["stage_vs_post_throughput"] = round(
        results["stage"]["requests_per_minute"] / results["post"]["requests_per_minute"], 1
    )
    results["setup"] = {
        "latency_seconds": LATENCY,
        "limits": LIMITS,
        "fault_mix": FAULT_MIX,
        "cpu_count": os.cpu_count(),
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
