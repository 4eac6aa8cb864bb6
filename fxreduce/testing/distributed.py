"""Run a function on several processes joined by torch.distributed, for tests of distributed training.

Each rank is a fresh, spawned process, so no CUDA or fork-unsafe state leaks in from the test runner,
and the ranks talk over gloo on 127.0.0.1, so the tests need neither a network nor a GPU. The run is
bounded: a rank that raises or hangs ends it, and its peers are killed instead of being left behind.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fxreduce.errors import InputError

_EXIT_GRACE_S = 5.0  # how long ranks that reported may take to leave the process group and exit
_SILENT_EXIT_GRACE_S = 1.0  # how long a result may lag behind its rank's exit in the queue's pipe


class RankError(RuntimeError):
    """A rank raised, crashed or hung. ``rank`` says which; ``remote_traceback`` is its traceback text."""

    def __init__(self, message: str, rank: int, remote_traceback: str | None = None):
        super().__init__(message)
        self.rank, self.remote_traceback = rank, remote_traceback


class RankTimeoutError(RankError, TimeoutError):
    """A rank did not finish within the timeout and was killed."""


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results by rank.

    Each process joins a gloo process group on 127.0.0.1 before ``fn`` runs and leaves it afterwards,
    so ``fn`` may call collectives or wrap a model in ``DistributedDataParallel`` directly.

    ``fn`` must be a module-level function: spawned processes import it by name, so lambdas and
    functions defined inside other functions are refused with ``InputError``. ``args`` and the
    results must be picklable. A script calling this needs an ``if __name__ == "__main__":`` guard,
    as with any spawn.

    The first rank to raise ends the run: the other ranks are killed and ``RankError`` carries that
    rank's number and traceback. ``timeout`` (seconds) bounds the whole run, process start included;
    past it the ranks still running are killed and ``RankTimeoutError`` is raised.
    """
    _check_importable(fn)
    if not isinstance(world_size, int) or world_size < 1:
        raise InputError(f"world_size={world_size!r} must be an int >= 1", where="run_distributed")
    if not timeout > 0:
        raise InputError(f"timeout={timeout!r} must be a positive number of seconds", where="run_distributed")
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(
            target=_run_rank,
            args=(rank, world_size, port, timeout, fn, args, results),
            name=f"run_distributed-rank{rank}",
        )
        for rank in range(world_size)
    ]
    try:
        for process in processes:
            process.start()
        values = _collect(processes, results, time.monotonic() + timeout, timeout)
    except BaseException:
        _stop(processes, grace=0.0)
        raise
    finally:
        results.close()
    _stop(processes, grace=_EXIT_GRACE_S)
    return values


def _check_importable(fn: Callable[..., Any]) -> None:
    qualname = getattr(fn, "__qualname__", "")
    if "<lambda>" in qualname or "<locals>" in qualname:
        kind = "a lambda" if "<lambda>" in qualname else "defined inside another function"
        raise InputError(
            f"run_distributed cannot run {qualname!r}: it is {kind}, and the spawned ranks import fn by name",
            where="run_distributed(fn=...)", fix="define fn with `def` at the top level of a module",
        )
    try:
        pickle.dumps(fn)
    except Exception as error:
        raise InputError(
            f"run_distributed cannot send {fn!r} to the spawned ranks: {error}",
            where="run_distributed(fn=...)", fix="pass a module-level function",
        ) from error


def _free_port() -> int:
    """A port the OS just reported free on loopback; the rank-0 store binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _loopback_interface() -> str | None:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def _run_rank(rank, world_size, port, timeout, fn, args, results) -> None:
    """Body of one rank's process: join the group, run ``fn``, report, leave the group."""
    # Without this gloo picks the interface the hostname resolves to, which a sandbox may not route.
    interface = _loopback_interface()
    if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        outcome = (rank, True, fn(rank, world_size, *args))
    except BaseException:
        outcome = (rank, False, traceback.format_exc())
    try:
        payload = pickle.dumps(outcome)
    except Exception:
        payload = pickle.dumps((rank, False, f"its return value cannot be pickled:\n{traceback.format_exc()}"))
    # Report before leaving the group: peers blocked on this rank fail once it leaves, and the
    # caller should hear this rank's error first.
    results.put(payload)
    if dist.is_initialized():
        dist.destroy_process_group()


def _collect(processes, results, deadline: float, timeout: float) -> list[Any]:
    world_size = len(processes)
    values: dict[int, Any] = {}
    exited_at: dict[int, float] = {}
    while len(values) < world_size:
        now = time.monotonic()
        running = [rank for rank in range(world_size) if rank not in values]
        if now >= deadline:
            raise RankTimeoutError(
                f"rank {running[0]} of {world_size} did not finish within {timeout} s "
                f"(ranks still running: {running}); they were killed",
                running[0],
            )
        try:
            rank, ok, value = pickle.loads(results.get(timeout=min(0.1, deadline - now)))
        except queue.Empty:
            for rank in running:
                if processes[rank].exitcode is None:
                    continue
                exited_at.setdefault(rank, now)
                if now - exited_at[rank] > _SILENT_EXIT_GRACE_S:
                    raise RankError(
                        f"rank {rank} of {world_size} exited with code {processes[rank].exitcode} before "
                        "reporting a result: it was killed, crashed in native code, or failed while starting "
                        "(e.g. a script without an `if __name__ == '__main__':` guard); its stderr says which",
                        rank,
                    ) from None
            continue
        if not ok:
            raise RankError(f"rank {rank} of {world_size} failed:\n{value}", rank, value)
        values[rank] = value
    return [values[rank] for rank in range(world_size)]


def _stop(processes, grace: float) -> None:
    """Wait up to ``grace`` seconds for the ranks to exit, then kill the ones still running."""
    deadline = time.monotonic() + grace
    for process in processes:
        if process.pid is None:
            continue
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
