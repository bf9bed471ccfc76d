"""Hashing a 32k-token prompt: kvbm vs bare xxh3 over the same bytes vs vLLM's sha256(pickle).

    python -m bench.hashing [--tokens 32768] [--repeat 15] [--real-vllm]

- kvbm: ``BlockHasher.hash_prompt`` from an int64 numpy array (includes validating and
  converting it to int32) and from an int32 array (no conversion).
- bare xxh3: one ``xxh3_128_digest`` per block over the prompt's int32 bytes, collected in a
  list comprehension; no chaining, no conversion, no validation: the floor. Goal: kvbm within 1.5x.
- vLLM: ``sha256(pickle.dumps((parent, tuple(block_tokens), None)))`` per block from the Python
  token list vLLM keeps (vllm/v1/core/kv_cache_utils.py ``hash_block_tokens`` with
  vllm/utils/hashing.py ``sha256``); ``--real-vllm`` calls vLLM's own functions instead of this
  copy of them. Goal: kvbm at least 5x faster.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle

import numpy as np
from xxhash import xxh3_128_digest

from bench.timing import best_of, print_table
from kvbm.hashing import BlockHasher, LayoutFingerprint


def vllm_scheme(real: bool):
    if real:
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import hash_block_tokens, init_none_hash

        init_none_hash(sha256)

        def run(token_list: list[int], bs: int) -> list[bytes]:
            parent, out = None, []
            for i in range(0, len(token_list) - bs + 1, bs):
                parent = hash_block_tokens(sha256, parent, token_list[i : i + bs], None)
                out.append(parent)
            return out

        return run

    def run_without_vllm(token_list: list[int], bs: int) -> list[bytes]:
        parent, out = b"\0" * 32, []
        for i in range(0, len(token_list) - bs + 1, bs):
            payload = pickle.dumps((parent, tuple(token_list[i : i + bs]), None), protocol=pickle.HIGHEST_PROTOCOL)
            parent = hashlib.sha256(payload).digest()
            out.append(parent)
        return out

    return run_without_vllm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--real-vllm", action="store_true", help="call vLLM's own hash functions")
    args = parser.parse_args()
    vllm_hash = vllm_scheme(args.real_vllm)
    tokens = np.random.default_rng(0).integers(0, 128_000, args.tokens, dtype=np.int64)
    token_list = tokens.tolist()
    rows = []
    for bs in (16, 32, 64, 128):
        hasher = BlockHasher(LayoutFingerprint("bench-model", "bfloat16", bs, 32, 8, 128, "bench"))
        n = args.tokens // bs
        data = tokens.astype("<i4").tobytes()
        step = bs * 4

        def bare() -> list[bytes]:
            return [xxh3_128_digest(data[off : off + step]) for off in range(0, n * step, step)]

        tokens32 = tokens.astype(np.int32)
        times = best_of(
            {
                "kvbm": lambda: hasher.hash_prompt(tokens),
                "kvbm32": lambda: hasher.hash_prompt(tokens32),
                "bare": bare,
                "vllm": lambda: vllm_hash(token_list, bs),
            },
            args.repeat,
        )
        per = {k: v / n * 1e9 for k, v in times.items()}
        rows.append(
            [
                bs,
                n,
                per["kvbm"],
                per["kvbm32"],
                per["bare"],
                per["vllm"],
                per["kvbm"] / per["bare"],
                per["kvbm32"] / per["bare"],
                per["vllm"] / per["kvbm"],
            ]
        )
    print_table(
        f"hashing a {args.tokens}-token prompt, ns per block (best of {args.repeat}"
        f"{', real vLLM functions' if args.real_vllm else ''})",
        [
            "block",
            "blocks",
            "kvbm int64 ns",
            "kvbm int32 ns",
            "bare xxh3 ns",
            "vLLM ns",
            "int64/bare",
            "int32/bare",
            "vLLM/kvbm int64",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
