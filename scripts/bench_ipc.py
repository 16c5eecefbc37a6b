#!/usr/bin/env python3
"""What the engine-process boundary costs per step: one step's outputs (N sequences, one
token each) pickled, sent over a socket pair to a reader thread and unpickled, as
engine/process.py does, timed over many steps.

    scripts/bench_ipc.py --steps 20000 --seqs 1,8,16
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from multiprocessing.connection import Connection

from server.engine.types import SeqOutput


def run(steps: int, seqs: int) -> float:
    """Microseconds per step, sender to receiver."""
    a, b = socket.socketpair()
    tx, rx = Connection(a.detach()), Connection(b.detach())
    done = threading.Event()

    def reader() -> None:
        for _ in range(steps):
            rx.recv()
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    step = [
        (rid, [SeqOutput(index=0, text=" word", token_ids=[1234], prompt_tokens=40,
                         completion_tokens=7)])
        for rid in range(seqs)
    ]  # fmt: skip
    start = time.perf_counter()
    for _ in range(steps):
        tx.send(("step", step))
    done.wait()
    elapsed = time.perf_counter() - start
    tx.close()
    rx.close()
    return elapsed / steps * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--seqs", default="1,8,16")
    args = p.parse_args()
    print("| sequences per step | µs per step | µs per token |")
    print("|---|---|---|")
    for n in (int(x) for x in args.seqs.split(",")):
        us = run(args.steps, n)
        print(f"| {n} | {us:.1f} | {us / n:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
