"""Several cooperating processes for ``cryosip reconstruct --stream`` (``jax.distributed``).

A run is distributed when it is given ``--coordinator HOST:PORT --num-processes N
--process-id I`` (all three), or when it runs as one of several tasks of a SLURM step
(``srun``: ``SLURM_NTASKS`` > 1; the process id is ``SLURM_PROCID``, the coordinator the first
host of ``SLURM_STEP_NODELIST`` on port ``CRYOSIP_COORDINATOR_PORT`` or, as JAX picks it,
``61440 + SLURM_JOB_ID % 4096``). :func:`initialize` starts JAX's distributed runtime
(``jax.distributed.initialize``; on CPUs with gloo collectives), after which ``jax.devices()``
lists every process's devices and the flow runs data-parallel over all of them
(``cryosip.sip.sharding``).

Failures: :func:`run` runs the command so that a failure of any process ends every process
with one clear line instead of a hang. The failing process posts its message to the
coordinator's key-value store and exits; a watchdog thread in every other process polls the
store and exits naming the failed process and its message. A process that dies without a word
(killed) breaks the next collective of the others (an error they report), or stops sending
heartbeats (JAX's coordination service then ends the others after ``--distributed-timeout``
seconds). Processes that cannot all connect within ``--distributed-timeout`` seconds fail
with a message naming the coordinator.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from ..data.errors import CryosipInputError

logger = logging.getLogger(__name__)

FAILED_KEY = "cryosip/failed/"
POLL_SECONDS = 0.5
GRACE_SECONDS = 2.0  # a failing process waits this long so that the others read its message


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Where this process sits in a multi-process run."""

    coordinator: str
    num_processes: int
    process_id: int
    source: str  # "flags" or "slurm"
    timeout: int = 300

    @property
    def is_writer(self) -> bool:
        """Only process 0 writes outputs."""
        return self.process_id == 0

    def describe(self) -> str:
        return f"process {self.process_id} of {self.num_processes}"


def _coordinator(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--coordinator takes HOST:PORT, got {text!r}")
    return text


def add_args(p) -> None:
    """The flags of a multi-process run (all three or none; SLURM's environment otherwise)."""
    from ._args import nonnegative_int, positive_int

    g = p.add_argument_group("several processes (with --stream; docs/scaling.md)")
    g.add_argument(
        "--coordinator",
        type=_coordinator,
        default=None,
        metavar="HOST:PORT",
        help="address of process 0, where the coordination service listens (every process "
        "gets the same); default under srun: the first host of the step",
    )
    g.add_argument(
        "--num-processes",
        type=positive_int,
        default=None,
        help="processes taking part (default under srun: SLURM_NTASKS)",
    )
    g.add_argument(
        "--process-id",
        type=nonnegative_int,
        default=None,
        help="this process's rank, 0..N-1; 0 writes the outputs (default under srun: SLURM_PROCID)",
    )
    g.add_argument(
        "--distributed-timeout",
        type=positive_int,
        default=300,
        metavar="SECONDS",
        help="how long processes wait for each other to connect, and for a silent one before "
        "giving up (JAX's heartbeat timeout)",
    )


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[001-004,9],gpu7`` -> ``node001``)."""
    head, depth = nodelist, 0
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            head = nodelist[:i]
            break
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    return prefix + rest.rstrip("]").split(",", 1)[0].split("-", 1)[0]


def slurm_env(environ=None) -> tuple[str, int, int] | None:
    """(coordinator, number of tasks, this task's id) from a SLURM step's environment, or None
    when not under ``srun`` with several tasks."""
    env = os.environ if environ is None else environ
    try:
        n = int(env["SLURM_NTASKS"])
        pid = int(env["SLURM_PROCID"])
    except (KeyError, ValueError):
        return None
    if n < 2:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
        return None
    port = env.get("CRYOSIP_COORDINATOR_PORT")
    if port is None:
        port = str(int(env.get("SLURM_JOB_ID", "0")) % 2**12 + (65535 - 2**12 + 1))
    return f"{_first_host(nodes)}:{port}", n, pid


def from_args(args, environ=None) -> Distributed | None:
    """The multi-process set-up asked for by the flags or by SLURM, or None (one process)."""
    flags = (args.coordinator, args.num_processes, args.process_id)
    timeout = int(getattr(args, "distributed_timeout", 300))
    if any(f is not None for f in flags):
        if any(f is None for f in flags):
            raise CryosipInputError(
                "--coordinator",
                "a multi-process run needs all of --coordinator HOST:PORT, --num-processes N "
                "and --process-id I",
            )
        coordinator, n, pid = flags
        source = "flags"
    else:
        found = slurm_env(environ)
        if found is None:
            return None
        coordinator, n, pid = found
        source = "slurm"
    if not 0 <= pid < n:
        raise CryosipInputError("--process-id", f"must be in 0..{n - 1}, got {pid}")
    if n == 1:
        return None
    if not args.stream:
        raise CryosipInputError(
            "--num-processes",
            "several processes run the streamed flow only: add --stream"
            + (" (or run one SLURM task)" if source == "slurm" else ""),
        )
    return Distributed(coordinator, n, pid, source, timeout)


def initialize(dist: Distributed) -> None:
    """Start JAX's distributed runtime in this process (before any computation)."""
    import jax
    from jax._src import xla_bridge

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if xla_bridge.backends_are_initialized():
        # `cryosip` logs its backend (jax.devices()) before running the command; no array exists
        # yet, so the backends can be dropped and created again by the distributed runtime
        from jax.extend.backend import clear_backends

        clear_backends()
    t0 = time.perf_counter()
    try:
        jax.distributed.initialize(
            coordinator_address=dist.coordinator,
            num_processes=dist.num_processes,
            process_id=dist.process_id,
            initialization_timeout=dist.timeout,
            heartbeat_timeout_seconds=dist.timeout,
            shutdown_timeout_seconds=dist.timeout,
        )
    except Exception as e:  # noqa: BLE001 - JAX raises XlaRuntimeError/ValueError/RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CryosipInputError(
            dist.coordinator,
            f"{dist.describe()}: the {dist.num_processes} processes did not all connect to the "
            f"coordinator within {dist.timeout} s (did every process start, with the same "
            f"--coordinator and --num-processes?): {first[:300]}",
        ) from None
    logger.info(
        "%s (%s): connected to %s in %.1f s; %d devices in all, %d here",
        dist.describe(),
        dist.source,
        dist.coordinator,
        time.perf_counter() - t0,
        len(jax.devices()),
        len(jax.local_devices()),
    )


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _posted_failures(dist: Distributed) -> list[tuple[int, str]]:
    """(process id, message) posted by other processes that failed."""
    client = _client()
    if client is None:
        return []
    try:
        entries = client.key_value_dir_get(FAILED_KEY)
    except Exception:  # noqa: BLE001 - the coordinator is gone
        return []
    out = []
    for key, value in entries:
        try:
            pid = int(key.rstrip("/").rsplit("/", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid != dist.process_id:
            out.append((pid, value))
    return sorted(out)


def _say(line: str) -> None:
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()
    sys.stdout.flush()


def _exit(line: str | None, code: int, linger: float = 0.0) -> None:
    """Print ``line`` and end this process now (JAX's shutdown barrier would wait for processes
    that are not coming); ``linger`` seconds first, so that others can still read the store."""
    if line:
        _say(line)
    if linger:
        time.sleep(linger)
    os._exit(code)


def _exit_if_another_failed(dist: Distributed, command: str, linger: float = 0.0) -> None:
    """End this process with the first failure another process posted, if any."""
    failed = _posted_failures(dist)
    if failed:
        pid, msg = failed[0]
        _exit(
            f"cryosip {command}: error: process {pid} of {dist.num_processes} failed: {msg} "
            f"(process {dist.process_id} stops too)",
            1,
            linger=linger,
        )


def _watch(dist: Distributed, command: str, done: threading.Event) -> None:
    while not done.wait(POLL_SECONDS):
        # process 0 hosts the coordination service: let the failed process end first
        linger = GRACE_SECONDS + 1.0 if dist.process_id == 0 else 0.0
        _exit_if_another_failed(dist, command, linger=linger)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(e, CryosipInputError):
        return first
    return f"{type(e).__name__}: {first}"[:500]


def _is_collective_failure(e: BaseException) -> bool:
    text = str(e)
    return any(
        s in text
        for s in ("Gloo", "gloo", "Connection closed", "heartbeat", "coordination service", "NCCL")
    )


def run(dist: Distributed, fn: Callable[[], int], command: str = "reconstruct") -> int:
    """``fn()`` in a started distributed run: its return code, or every process ends with one
    line naming the first failure (never returns on failure)."""
    from jax import distributed as jd

    done = threading.Event()
    watchdog = threading.Thread(
        target=_watch, args=(dist, command, done), name="cryosip-distributed-watchdog", daemon=True
    )
    watchdog.start()
    try:
        rc = fn()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the other processes
        done.set()
        if _is_collective_failure(e):
            time.sleep(GRACE_SECONDS)  # a process that failed with a message posts it first
            _exit_if_another_failed(dist, command)
            _exit(
                f"cryosip {command}: error: {dist.describe()}: another process ended "
                f"(a collective operation failed: {_one_line(e)})",
                1,
            )
        msg = _one_line(e)
        if isinstance(e, KeyboardInterrupt):
            msg = "interrupted"
        if not isinstance(e, (CryosipInputError, KeyboardInterrupt)):
            logger.exception("%s failed", dist.describe())
        _say(f"cryosip {command}: error: {dist.describe()}: {msg}")
        try:
            _client().key_value_set(f"{FAILED_KEY}{dist.process_id}", msg)
        except Exception:  # noqa: BLE001 - the coordinator may be the one that failed
            pass
        code = 2 if isinstance(e, CryosipInputError) else 130 if msg == "interrupted" else 1
        _exit(None, code, linger=GRACE_SECONDS)
        raise  # pragma: no cover - _exit does not return
    done.set()
    jd.shutdown()  # waits at the coordinator's barrier until every process is done
    return int(rc or 0)
