"""A child process for the G3 restart, crash and disk-full tests.

    python -m tests.disk.diskproc write DIR --seed S --blocks N --batch B [--progress FILE]
        Write one prompt of N blocks through the real path (G1 -> G2 -> G3 handlers, manager
        complete) in batches of B; after each batch is committed, append its hashes (hex) to
        FILE and fsync it. Exits cleanly (closing the tier) and prints the stats as JSON.
    python -m tests.disk.diskproc worker DIR --g3-blocks N --g2-blocks M
        The worker half alone (vLLM's worker process): G1 arrays, G2 buffer and the G3 slot
        files, no manager. Reads pickled requests from stdin and answers on stdout:
        ("fill", ids, hashes) -> None; ("run", jobs) -> [JobResult]; ("check", ids, hashes)
        -> [bool]; ("exit",) ends it.
    python -m tests.disk.diskproc fsize DIR --limit-slots L --blocks N
        Format DIR, then limit the file size (RLIMIT_FSIZE, SIGXFSZ ignored) to L slots and
        write N blocks in two batches: the blocks past the limit fail. Then read back every
        block G3 holds and print {"stats": ..., "served": n, "intact": n} as JSON.

Block bytes are ``content(hash)`` (tests/disk/conftest.py), so the parent can check any block.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys

from .conftest import BLOCK_SIZE, STRIDE, build_node, g3_config, make_blocks


def write(args: argparse.Namespace) -> None:
    config = g3_config(args.dir, g3_blocks=args.blocks, g2_capacity_blocks=args.batch)
    node = build_node(config, g1_blocks=args.batch)
    blocks = make_blocks(args.blocks, seed=args.seed)
    progress = open(args.progress, "a") if args.progress else None  # noqa: SIM115 - kept open on purpose
    for a in range(0, args.blocks, args.batch):
        part = blocks[a : a + args.batch]
        results = node.write(part, list(range(len(part))))
        assert all(r.ok for r in results), [r.reason for r in results]
        if progress is not None:
            progress.write("".join(h.hex() + "\n" for h in part.hashes))
            progress.flush()
            os.fsync(progress.fileno())
    print(node.manager.stats().to_json())
    node.close()


def fsize(args: argparse.Namespace) -> None:
    config = g3_config(args.dir, g3_blocks=args.blocks, g2_capacity_blocks=args.blocks)
    node = build_node(config, g1_blocks=args.blocks)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    limit = args.limit_slots * STRIDE
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    blocks = make_blocks(args.blocks, seed=3)
    half = args.blocks // 2
    node.write(blocks[:half], list(range(half)))
    node.write(blocks[half:], list(range(half, args.blocks)))
    written = node.manager.stats().to_dict()
    node.close()
    node = build_node(config, g1_blocks=args.blocks)  # G2 starts empty: every hit is a G3 read
    match = node.manager.lookup(blocks)
    plan = node.manager.onboard(blocks, list(range(args.blocks)))
    results = node.run(plan.jobs)
    missing = set(plan.missing_block_ids.tolist())
    served = [i for i in range(args.blocks) if i not in missing]
    intact = sum(node.holds(i, blocks.hashes[i]) for i in served)
    print(
        json.dumps(
            {
                "written": written,
                "matched": match.num_blocks,
                "tiers": sorted({t.value for t in match.tiers}),
                "served": len(served),
                "intact": intact,
                "read_ok": all(r.ok for r in results),
            }
        )
    )
    node.close()


def worker(args: argparse.Namespace) -> None:
    import pickle

    import numpy as np

    from kvbm.layout import EngineKV
    from kvbm.tiers.disk.handlers import disk_handlers
    from kvbm.tiers.host import HostBuffer
    from kvbm.transfer.engine import TransferEngine
    from kvbm.transfer.host_copy import host_handlers

    from .conftest import BLOCK_BYTES, LAYERS, content, make_fingerprint

    config = g3_config(args.dir, g3_blocks=args.g3_blocks, g2_capacity_blocks=args.g2_blocks)
    layers = [np.zeros((64, w), dtype=np.uint8) for w in LAYERS]
    g1 = EngineKV.from_tensors(layers)
    g2 = HostBuffer(config.g2_slots(BLOCK_BYTES), BLOCK_BYTES)
    disk = disk_handlers(config, g2, g1, fingerprint=make_fingerprint())
    engine = TransferEngine({**host_handlers(g1, g2), **disk}, threaded=True)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        request = pickle.load(inp)
        if request[0] == "exit":
            break
        if request[0] == "fill":
            for block_id, h in zip(request[1], request[2]):
                for layer, data in zip(layers, content(h)):
                    layer[block_id] = data
            answer = None
        elif request[0] == "run":
            for job in request[1]:
                engine.submit(job)
            engine.wait([job.job_id for job in request[1]])
            answer = engine.poll()
        else:
            answer = [
                all(np.array_equal(layer[i], data) for layer, data in zip(layers, content(h)))
                for i, h in zip(request[1], request[2])
            ]
        pickle.dump(answer, out)
        out.flush()
    engine.close()
    disk.close()


def main() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--blocks", type=int, default=16)
    w.add_argument("--batch", type=int, default=4)
    w.add_argument("--progress")
    f = sub.add_parser("fsize")
    f.add_argument("dir")
    f.add_argument("--limit-slots", type=int, required=True)
    f.add_argument("--blocks", type=int, default=16)
    k = sub.add_parser("worker")
    k.add_argument("dir")
    k.add_argument("--g3-blocks", type=int, default=16)
    k.add_argument("--g2-blocks", type=int, default=4)
    args = parser.parse_args()
    assert BLOCK_SIZE > 0
    {"write": write, "fsize": fsize, "worker": worker}[args.command](args)


if __name__ == "__main__":
    main()
