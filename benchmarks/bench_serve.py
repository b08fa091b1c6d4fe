"""Serving speed: `rwkvpy serve` in its own process, N concurrent streaming clients over loopback.

    python benchmarks/bench_serve.py [--arch rwkv4|rwkv7] [--layers 12 --width 768] [--streams 1,8,32]
                                     [--tokens 64] [--repeats 3] [--dtype fp32|bf16|fp16] [--tokenizer ../shared/data/20B_tokenizer.json]

Random weights with the 169M shape (vocabulary 50277, the 20B tokenizer) by default; prompts are
random token ids (the completions API takes them), greedy decoding. The concurrency levels take
turns for ``--repeats`` rounds; reported per stream count, medians over the rounds: time to first
token, inter-token latency p50/p99, total tokens/s and the server's mean time of one batched model
step (from /metrics: the rest of a token's time is the engine's sampling, HTTP and the clients,
which share the machine). Then time to first token with a cached 1,000-token prefix against an
uncached one, and a decoding stream's inter-token latency while another request's 4,000-token
prompt is read against its p50 alone (``--repeats`` rounds of each, alone and during in turn).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from rwkvpy.checkpoint import save_native
from rwkvpy.models import RWKV4Config, RWKV7Config, random_state_dict
from rwkvpy.serve import free_port

NAME = "bench"
# One client for every request, its connections kept alive: a client per request builds an SSL
# context each time (~10 ms of CPU), and 32 of them at once, on the cores the server uses, were
# a third of the 32-stream runs' time to first token.
CLIENT = httpx.Client(limits=httpx.Limits(max_connections=128, max_keepalive_connections=128))


def stream_request(url: str, prompt: list[int], max_tokens: int, timeout: float = 600) -> dict:
    """One streaming completion; the arrival time of every chunk that carried text."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    times = []
    with CLIENT.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"] is not None:
                    times.append(time.perf_counter())
    return {"start": t0, "times": times}


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def concurrent(url: str, n: int, tokens: int, vocab: int, seed: int) -> dict:
    import random

    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(16)] for _ in range(n)]
    results = [None] * n

    def run(i):
        results[i] = stream_request(url, prompts[i], tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["start"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    total = sum(len(r["times"]) for r in results)
    return {"streams": n, "ttft_s": statistics.median(ttft), "itl_p50_s": percentile(itl, 0.5),
            "itl_p99_s": percentile(itl, 0.99), "tok_s": total / wall}


def step_seconds(url: str) -> tuple[float, float]:
    """(sum, count) of the server's decode step times, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("rwkvpy_step_seconds_sum", "rwkvpy_step_seconds_count"):
            values[name] = float(value)
    return values["rwkvpy_step_seconds_sum"], values["rwkvpy_step_seconds_count"]


def ttft(url: str, prompt: list[int]) -> float:
    r = stream_request(url, prompt, 1)
    return r["times"][0] - r["start"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("rwkv4", "rwkv7"), default="rwkv4")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the concurrency levels (medians reported)")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                               "20B_tokenizer.json"))
    ap.add_argument("--dtype", default="fp32", help="how the server stores matrices: fp32, bf16, fp16")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.arch == "rwkv7":
        cfg = RWKV7Config(vocab_size=50277, n_embd=args.width, n_layer=args.layers)
    else:
        cfg = RWKV4Config(vocab_size=50277, n_embd=args.width, n_layer=args.layers)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        save_native(cfg, random_state_dict(cfg, seed=0), Path(tmp) / "m")
        server = subprocess.Popen([sys.executable, "-m", "rwkvpy", "serve", "--model", str(Path(tmp) / "m"),
                                   "--tokenizer", args.tokenizer, "--model-name", NAME, "--port", str(port),
                                   "--max-streams", "32", "--dtype", args.dtype], stdout=subprocess.DEVNULL,
                                  stderr=open(Path(tmp) / "server.log", "w"), env=os.environ.copy())
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            print(f"model: {cfg}, matrices {args.dtype}")
            print(next(ln for ln in (Path(tmp) / "server.log").read_text().splitlines()
                       if ln.startswith("rwkvpy serve:")))
            stream_request(url, [1, 2, 3], 4)  # warm-up
            # Concurrency levels take turns, ``--repeats`` rounds: the VM's speed drifts by tens of
            # percent within minutes, and a ratio of two levels measured minutes apart carries it.
            rounds: dict[int, list[dict]] = {int(n): [] for n in args.streams.split(",")}
            for rep in range(args.repeats):
                for n in rounds:
                    before = step_seconds(url)
                    r = concurrent(url, n, args.tokens, cfg.vocab_size, seed=n + 1000 * rep)
                    after = step_seconds(url)
                    r["model_step_s"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                    rounds[n].append(r)
            results = {"concurrency": [{key: statistics.median(r[key] for r in rs) for key in rs[0]}
                                       for rs in rounds.values()],
                       "rounds": {str(n): rs for n, rs in rounds.items()}}
            print(f"\n{'streams':>8s} {'TTFT s':>8s} {'ITL p50 ms':>11s} {'ITL p99 ms':>11s} {'tok/s':>8s} "
                  f"{'model step ms':>14s}   (medians of {args.repeats} rounds; tok/s of each round)")
            for r, rs in zip(results["concurrency"], rounds.values()):
                print(f"{r['streams']:8d} {r['ttft_s']:8.3f} {r['itl_p50_s'] * 1e3:11.1f} "
                      f"{r['itl_p99_s'] * 1e3:11.1f} {r['tok_s']:8.1f} {r['model_step_s'] * 1e3:14.1f}   "
                      + " ".join(f"{x['tok_s']:.1f}" for x in rs))
            one = rounds[int(args.streams.split(",")[0])]
            for r, rs in zip(results["concurrency"][1:], list(rounds.values())[1:]):
                per_round = [a["tok_s"] / b["tok_s"] for a, b in zip(rs, one)]
                print(f"tok/s with {r['streams']} streams / 1 stream: x{r['tok_s'] / results['concurrency'][0]['tok_s']:.2f}"
                      f" (medians; round by round: {', '.join(f'x{x:.2f}' for x in per_round)})")

            import random

            rng = random.Random(7)
            prefix = [rng.randrange(cfg.vocab_size) for _ in range(1000)]
            other = [rng.randrange(cfg.vocab_size) for _ in range(1000)]
            stream_request(url, prefix, 1)  # its end is now cached
            cached = statistics.median(ttft(url, prefix + [i]) for i in range(3))
            cold = statistics.median(ttft(url, other[:-i] + [i]) for i in range(1, 4))
            results["prefix"] = {"ttft_cached_s": cached, "ttft_uncached_s": cold, "ratio": cached / cold}
            print(f"\nTTFT with a cached 1,000-token prefix {cached:.3f} s, uncached {cold:.3f} s: "
                  f"x{cached / cold:.3f}")

            alone_p50, during_p99, gaps = [], [], 0
            for _ in range(args.repeats):
                alone = stream_request(url, [5, 6, 7], 48)
                alone_p50.append(statistics.median(b - a for a, b in zip(alone["times"], alone["times"][1:])))
                long_prompt = [rng.randrange(cfg.vocab_size) for _ in range(4000)]
                holder = {}
                decoding = threading.Thread(target=lambda: holder.update(r=stream_request(url, [8, 9, 10], 400)))
                decoding.start()
                time.sleep(1.0)
                t_long = time.perf_counter()
                stream_request(url, long_prompt, 1)
                t_end = time.perf_counter()
                decoding.join()
                times = holder["r"]["times"]
                during = [b - a for a, b in zip(times, times[1:]) if t_long <= a <= t_end]
                during_p99.append(percentile(during, 0.99))
                gaps += len(during)
            p50, p99 = statistics.median(alone_p50), statistics.median(during_p99)
            results["prefill_interference"] = {"itl_p50_alone_s": p50, "itl_p99_during_prefill_s": p99,
                                               "ratio": p99 / p50, "gaps": gaps,
                                               "rounds": {"alone_p50_s": alone_p50, "during_p99_s": during_p99}}
            print(f"ITL p99 while a 4,000-token prompt is read: {p99 * 1e3:.1f} ms vs p50 alone {p50 * 1e3:.1f} ms: "
                  f"x{p99 / p50:.2f} (medians of {args.repeats} rounds, {gaps} gaps; round by round: "
                  + ", ".join(f"x{b / a:.2f}" for a, b in zip(alone_p50, during_p99)) + ")")
        finally:
            server.terminate()
            server.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
