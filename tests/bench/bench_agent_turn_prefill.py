"""Benchmark: an agent turn on the embedded model, cold (no prefix cache hit) vs warm (same prefix).

OpenClaw sends a system prompt + tool schemas of 8-13K tokens before every user message. This
builds a synthetic one of ~10K tokens (the model's own chat template, tools passed to it), then,
round by round in one process:

- cold turn: a system prompt nobody has sent before (a fresh nonce at its very start, so no
  cached prefix matches) + a short user message;
- warm turn: the same system prompt + a different user message (the prefix cache holds the cold
  turn's K/V: only the user message is prefilled).

It reports TTFT and total time (32 greedy tokens) for both, side by side (medians and each
round), the cold prefill rate, and how long a concurrent stream waits between tokens while a
cold 10K prompt prefills (chunked prefill: it must not starve). In-process through the Engine
(the HTTP layer adds milliseconds). Not a test; run it by hand:
`.venv/bin/python tests/bench/bench_agent_turn_prefill.py [--rounds 3] [--tokens 10000]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

from inference.embedded.engine import Engine
from inference.embedded.sampling import SamplingParams

TOOL_NAMES = ["read_file", "write_file", "edit_file", "list_dir", "grep", "bash", "web_fetch",
              "web_search", "browser_open", "browser_click", "memory_get", "memory_set",
              "cron_add", "cron_list", "message_send", "image_describe"]  # fmt: skip


def tools(n_params: int) -> list[dict[str, Any]]:
    """Plausible tool schemas (verbose descriptions, as agents' are)."""
    out = []
    for i, name in enumerate(TOOL_NAMES):
        props = {
            f"arg_{j}": {
                "type": ["string", "integer", "boolean"][j % 3],
                "description": f"Parameter {j} of {name}: controls how the {name} tool treats "
                f"its input; see the workspace guidelines, section {i}.{j}, before setting it.",
            }
            for j in range(n_params)
        }
        out.append(
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": f"The {name} tool. Use it when the task needs {name}; never "
                    "guess its output. Report errors to the user verbatim.",
                    "parameters": {"type": "object", "properties": props, "required": ["arg_0"]},
                },
            }
        )
    return out


SYSTEM = """You are a personal assistant running inside OpenClaw, an always-on agent runtime.
## Workspace
Your working directory is /home/agent/workspace. Files you write persist across sessions.
## Safety
Never exfiltrate secrets. Ask before sending messages on the user's behalf. {nonce}
## Guidelines
"""


def agent_prompt(engine: Engine, target: int, nonce: str, user: str) -> list[int]:
    """Chat-template token ids of [system, user] with tool schemas, system part ~`target`."""
    rules = [
        f"{i}. When a request touches area {i}, prefer the tools over guessing, quote file paths "
        f"exactly, and keep answers short unless asked otherwise."
        for i in range(1, 400)
    ]
    n_params, n_rules = 6, 10
    while True:  # grow until the prompt reaches the target size
        # SmolLM2's chat template ignores `tools`: the schemas go into the system text, as a
        # template that renders them would put them (before the conversation).
        system = (
            SYSTEM.format(nonce=nonce)
            + "\n".join(rules[:n_rules])
            + "\n## Tools\n"
            + json.dumps(tools(n_params), indent=1)
        )
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        ids = engine.chat_prompt(msgs)
        if len(ids) >= target or n_rules >= len(rules):
            return ids
        n_rules += 10


def turn(engine: Engine, ids: list[int], max_tokens: int) -> dict[str, float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    ttft, cached, text = None, 0, []
    for out in engine.submit(ids, params):
        ttft = ttft or time.perf_counter() - start
        cached = out.cached_tokens
        text.append(out.text)
    total = time.perf_counter() - start
    return {"ttft": ttft or total, "total": total, "cached": cached, "prompt": len(ids)}


def starvation(engine: Engine, ids: list[int]) -> tuple[float, float, int]:
    """A short stream decodes while a cold long prompt prefills: (its worst and median
    inter-token gap during that time, tokens it got)."""
    gaps: list[float] = []
    stop = threading.Event()

    def short_stream() -> None:
        params = SamplingParams(max_tokens=20000, temperature=0, ignore_eos=True)
        handle = engine.submit(engine.encode("Tell me a long story."), params)
        last = None
        for _ in handle:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            if stop.is_set():
                handle.cancel()

    t = threading.Thread(target=short_stream)
    t.start()
    time.sleep(1.0)  # decoding
    n0 = len(gaps)
    turn(engine, ids, 1)
    during = gaps[n0:]
    stop.set()
    t.join(timeout=60)
    return max(during or [0.0]), statistics.median(during or [0.0]), len(during)


def chunk_rates(engine: Engine, ids: list[int], sizes: list[int]) -> dict[int, float]:
    """Prefill rate (tok/s) of `ids` alone through the runner, by chunk size (0: one call)."""
    rates = {}
    for size in sizes:
        cache = engine.runner.new_cache(len(ids))
        start = time.perf_counter()
        step = size or len(ids)
        for s in range(0, len(ids), step):
            engine.runner.prefill(cache, ids[s : s + step])
        rates[size] = len(ids) / (time.perf_counter() - start)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=10000, help="system prompt + tools size")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    ap.add_argument(
        "--chunks", default="", help="also compare prefill chunk sizes, e.g. 0,4096,2048,512"
    )
    args = ap.parse_args()

    engine = Engine.load(None, args.cache_dir, max_model_len=32768, kv_dtype=args.kv_dtype)
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; context "
        f"{engine.max_model_len}, kv {args.kv_dtype}, chunks {engine.prefill_chunk}/"
        f"{engine.prefill_chunk_alone}, {args.rounds} rounds, {args.max_tokens} new tokens"
    )
    engine.generate(engine.encode("warm up"), SamplingParams(max_tokens=2))
    rows = []
    for r in range(args.rounds):
        nonce = f"Session {time.time_ns()}."  # unique: the cold turn cannot hit the cache
        cold_ids = agent_prompt(engine, args.tokens, nonce, f"Round {r}: what is in my inbox?")
        warm_ids = agent_prompt(engine, args.tokens, nonce, "Summarise yesterday's notes.")
        cold = turn(engine, cold_ids, args.max_tokens)
        warm = turn(engine, warm_ids, args.max_tokens)
        rows.append((cold, warm))
        print(
            f"round {r}: prompt {cold['prompt']} tok | cold TTFT {cold['ttft']:6.1f} s, total "
            f"{cold['total']:6.1f} s | warm TTFT {warm['ttft']:6.2f} s, total "
            f"{warm['total']:6.2f} s, cached {warm['cached']} tok",
            flush=True,
        )

    def med(i: int, k: str) -> float:
        return statistics.median(row[i][k] for row in rows)

    c_ttft, w_ttft = med(0, "ttft"), med(1, "ttft")
    print(f"\n{'median':12} {'cold':>10} {'warm':>10}  speed-up")
    print(f"{'TTFT':12} {c_ttft:9.2f}s {w_ttft:9.2f}s  {c_ttft / w_ttft:.0f}x")
    c_tot, w_tot = med(0, "total"), med(1, "total")
    print(f"{'total':12} {c_tot:9.2f}s {w_tot:9.2f}s  {c_tot / w_tot:.1f}x")
    print(f"cold prefill rate: {med(0, 'prompt') / c_ttft:.0f} tok/s (prompt + first token)")
    print(f"warm: {med(1, 'cached'):.0f} of {med(1, 'prompt'):.0f} prompt tokens from the cache")

    nonce = f"Session {time.time_ns()}."
    worst, median_gap, n = starvation(engine, agent_prompt(engine, args.tokens, nonce, "Hi."))
    print(
        f"a concurrent stream during a cold {args.tokens}-token prefill: {n} tokens, "
        f"inter-token gap median {median_gap:.2f} s, worst {worst:.2f} s"
    )
    rates: dict[int, float] = {}
    if args.chunks:
        nonce = f"Session {time.time_ns()}."
        ids = agent_prompt(engine, args.tokens, nonce, "Hi.")
        rates = chunk_rates(engine, ids, [int(x) for x in args.chunks.split(",")])
        for size, rate in rates.items():
            print(f"prefill {len(ids)} tok alone, chunk {size or 'whole'}: {rate:.0f} tok/s")
    engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rounds": rows, "starvation": [worst, median_gap, n], "chunks": rates}, f, indent=1
            )


if __name__ == "__main__":
    main()
