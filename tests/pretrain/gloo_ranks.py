"""Run a function on two real gloo ranks in child processes and collect what each sends back (test helper)."""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

RankMain = Callable[[int, int, Connection], None]  # (rank, port, conn): joins the group, sends one result on conn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(target: RankMain, world_size: int = 2, start_method: str = "spawn", wait_s: float = 60) -> list[Any]:
    """Start ``world_size`` processes running ``target(rank, port, conn)``; return their results in rank order.

    ``start_method``: ``fork`` skips re-importing torch, but autograd's worker threads do not survive a fork once the
    parent has run a backward pass, so ``spawn`` is the safe default.
    """
    port = free_port()
    ctx = multiprocessing.get_context(start_method)
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = [ctx.Process(target=target, args=(rank, port, pipes[rank][1])) for rank in range(world_size)]
    for p, (_, sender) in zip(procs, pipes, strict=True):
        p.start()
        sender.close()  # the child holds it now: a rank that dies gives EOF here instead of a silent wait
    results = []
    for receiver, _ in pipes:
        assert receiver.poll(wait_s), "a rank did not answer"
        results.append(receiver.recv())
    for p in procs:
        p.join(120)  # a rank's exit (gloo's teardown) took over 30 s on a loaded 2-core machine
        assert p.exitcode == 0
    return results
