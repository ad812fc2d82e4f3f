"""What every benchmark script shares: servers, signal-safe cleanup, timing, and the result tables.

Servers, both from `django_distcache.devcluster`: a Redis Cluster (3 primaries with 1 replica each unless
--replicas says otherwise; base port 7400; data dir `.devcluster/bench-<port>` under the repo root) and a
standalone Redis on the base port + 9, past the largest cluster's nodes (never the machine's 6379). Both
are stopped when the script ends, on error, on Ctrl-C and on SIGTERM/SIGHUP; after a `kill -9` the next run
with the same base port takes them over and stops them.

Timing: every contender runs one slice as a warm-up, then `reps` repetitions of `slices` slices each; the
contenders of one comparison take turns slice by slice, so a burst of noise on the shared machine hits all
of them alike (see `measure`). Reported: the median time per operation, and ratios of medians with the
min-max range of the per-repetition ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from django_distcache.devcluster import DevCluster, StandaloneServer, find_server_binary

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_PORT = 7400
STANDALONE_PORT_OFFSET = 9  # the cluster takes base .. base + 8 (3 primaries, up to 2 replicas each)
HOST = "127.0.0.1"
INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command line


def common_parser(module: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    add_common_arguments(parser)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="also print the results as Markdown")
    parser.add_argument(
        "--keep-cluster", action="store_true", help="leave the benchmark cluster running at the end"
    )
    parser.add_argument(
        "--reps", type=_positive(int), default=5, help="timed repetitions per contender (default 5)"
    )
    parser.add_argument(
        "--scale",
        type=_positive(float),
        default=1.0,
        help="multiply the operations per repetition (default 1.0)",
    )
    parser.add_argument(
        "--base-port", type=int, default=DEFAULT_BASE_PORT, help="first port of the benchmark cluster"
    )
    parser.add_argument(
        "--replicas", type=int, default=1, choices=(0, 1, 2), help="replicas per primary (default 1)"
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if a target is missed")


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    """The options of `add_common_arguments`, as argv for a child script."""
    argv = ["--reps", str(args.reps), "--scale", str(args.scale), "--base-port", str(args.base_port)]
    argv += ["--replicas", str(args.replicas)]
    for flag in ("markdown", "keep_cluster", "strict"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


# --------------------------------------------------------------------------- signals


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, like Ctrl-C, so `finally` blocks get to clean up."""
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in INTERRUPTING_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM/SIGHUP while cleaning up, so a second Ctrl-C cannot leave servers behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *INTERRUPTING_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- servers


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Environment:
    cluster: DevCluster
    cluster_urls: list[str]
    standalone: StandaloneServer
    info: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def servers(
    base_port: int = DEFAULT_BASE_PORT, keep_cluster: bool = False, replicas: int = 1
) -> Iterator[Environment]:
    """Start the cluster and the standalone server; stop them at the end, whatever happens."""
    binary = find_server_binary()
    cluster = DevCluster(
        base_port=base_port,
        primaries=3,
        replicas=replicas,
        data_dir=ROOT / ".devcluster" / f"bench-{base_port}",
        server_binary=binary,
    )
    standalone_port = base_port + STANDALONE_PORT_OFFSET
    standalone = StandaloneServer(
        standalone_port, ROOT / ".devcluster" / f"bench-standalone-{standalone_port}"
    )
    try:
        with signals_interrupt():
            log(f"starting the Redis Cluster on {HOST}:{cluster.ports[0]}-{cluster.ports[-1]}")
            urls = cluster.up(timeout=60)
            standalone.up()
            log(f"standalone Redis on {standalone.url} (pid {standalone.pid()})")
            environment = Environment(cluster, urls, standalone)
            environment.info = describe_environment(environment)
            yield environment
    finally:
        with shielded():
            try:
                standalone.down()
                log("standalone Redis stopped")
            except Exception as error:  # keep going: the cluster must still come down
                log(f"could not stop the standalone Redis: {error!r}")
            if keep_cluster:
                log(f"--keep-cluster: the cluster keeps running in {cluster.data_dir}")
            else:
                try:
                    cluster.down()
                    log("cluster stopped and its data dir removed")
                except Exception as error:
                    log(f"could not stop the cluster: {error!r}")


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _code_version() -> str:
    """The commit measured, and whether the package had uncommitted changes at the time."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "django_distcache"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not commit:
        return "unknown (not a git checkout)"
    return f"{commit}" + (" + uncommitted changes in django_distcache/" if dirty else "")


def describe_environment(environment: Environment) -> dict[str, str]:
    with redis.Redis.from_url(environment.standalone.url, decode_responses=True) as client:
        server = client.info("server")
    load = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} CPUs ({_cpu_model()}), shared; load average 1/5/15 min at start: "
        + load,
        "os": platform.platform(),
        "python": platform.python_version(),
        "code": _code_version(),
        "redis server": f"{server['redis_version']} ({environment.cluster.server_binary}), cluster of "
        f"3 primaries with {environment.cluster.replicas} replica(s) each, and a standalone server; all on "
        "loopback",
        "libraries": ", ".join(
            f"{name} {_version(name)}"
            for name in ("django-distcache", "redis", "hiredis", "Django", "django-redis")
        ),
    }


# --------------------------------------------------------------------------- timing


@dataclass
class Contender:
    """Something to time: one `run()` performs `ops` operations (one slice of a repetition)."""

    name: str
    run: Callable[[], Any]
    ops: int


def measure(contenders: Sequence[Contender], reps: int, slices: int, title: str) -> dict[str, list[float]]:
    """Seconds per operation of every contender, one value per repetition.

    A repetition is `slices` runs of every contender, the contenders taking turns slice by slice (in an
    order that rotates each repetition), so that noise from other tenants of the machine spreads over all
    of them instead of landing on whichever happened to run at the time. The garbage collector is off
    while timing (as in `timeit`) and runs between repetitions.
    """
    log(f"{title}: {len(contenders)} contenders x (1 warm-up + {reps} reps) x {slices} slices")
    for contender in contenders:
        contender.run()
    totals: dict[str, list[float]] = {c.name: [] for c in contenders}
    gc_was_enabled = gc.isenabled()
    try:
        for rep in range(reps):
            gc.collect()
            gc.disable()
            shift = rep % len(contenders)
            order = [*contenders[shift:], *contenders[:shift]]
            spent = dict.fromkeys(totals, 0.0)
            for _ in range(slices):
                for contender in order:
                    started = time.perf_counter()
                    contender.run()
                    spent[contender.name] += time.perf_counter() - started
            gc.enable()
            for contender in contenders:
                totals[contender.name].append(spent[contender.name] / (contender.ops * slices))
    finally:
        if gc_was_enabled:
            gc.enable()
    return totals


# --------------------------------------------------------------------------- results


@dataclass
class Target:
    label: str  # e.g. "1"
    at_least: float | None = None
    at_most: float | None = None

    def check(self, ratio: float) -> bool:
        if self.at_least is not None and ratio < self.at_least:
            return False
        return not (self.at_most is not None and ratio > self.at_most)

    def describe(self) -> str:
        if self.at_least is not None:
            return f"≥ {self.at_least:.2f}"
        return f"≤ {self.at_most:.2f}"


@dataclass
class Row:
    """One comparison. `throughput` rows show ops/s, the others µs per call.

    The ratio is "speed" (baseline time / our time: above 1 means we are faster) or "time" (our time /
    baseline time: above 1 means we are slower); the target column names which.
    """

    operation: str
    ours_label: str
    ours: list[float]
    baseline_label: str
    baseline: list[float]
    throughput: bool
    ratio_kind: str  # "speed" | "time"
    target: Target | None = None

    def ratio(self) -> float:
        ours, base = statistics.median(self.ours), statistics.median(self.baseline)
        return base / ours if self.ratio_kind == "speed" else ours / base

    def ratio_range(self) -> tuple[float, float]:
        pairs = zip(self.ours, self.baseline, strict=True)
        if self.ratio_kind == "speed":
            ratios = [base / ours for ours, base in pairs]
        else:
            ratios = [ours / base for ours, base in pairs]
        return min(ratios), max(ratios)

    def ratio_meaning(self) -> str:
        if self.throughput:
            return "ours/base ops/s" if self.ratio_kind == "speed" else "base/ours ops/s"
        return "base/ours time" if self.ratio_kind == "speed" else "ours/base time"

    def result(self) -> str:
        if self.target is None:
            return "info"
        return "PASS" if self.target.check(self.ratio()) else "MISS"

    def cells(self) -> list[str]:
        low, high = self.ratio_range()
        target = f"{self.target.describe()} ({self.ratio_meaning()})" if self.target else "—"
        return [
            self.operation,
            f"{self.ours_label}: {self.format(self.ours)}",
            f"{self.baseline_label}: {self.format(self.baseline)}",
            f"{self.ratio():.2f}× ({low:.2f}–{high:.2f})",
            target if self.target else f"info ({self.ratio_meaning()})",
            self.result(),
        ]

    def format(self, samples: list[float]) -> str:
        seconds = statistics.median(samples)
        if self.throughput:
            return f"{1 / seconds:,.0f} ops/s"
        micro = seconds * 1e6
        return f"{micro:,.1f} µs" if micro < 100 else f"{micro:,.0f} µs"


@dataclass
class Check:
    """A measured count with an absolute target (connections opened, reads failed): no baseline to divide
    by. `samples`: one value per repetition; the worst repetition is judged (the largest against an upper
    bound, the smallest against a lower one)."""

    label: str
    what: str
    samples: list[float]
    unit: str
    target: Target

    def value(self) -> float:
        return max(self.samples) if self.target.at_most is not None else min(self.samples)

    def result(self) -> str:
        return "PASS" if self.target.check(self.value()) else "MISS"

    def cells(self) -> list[str]:
        median = statistics.median(self.samples)
        return [
            self.what,
            f"{self.value():g} {self.unit} (median {median:g}; {len(self.samples)} reps)",
            self.target.describe(),
            self.result(),
        ]


CHECK_HEADER = ["Measured", "Worst repetition", "Target", "Result"]
RESULT_HEADER = ["Operation", "Ours (median)", "Baseline (median)", "Ratio (min–max)", "Target", "Result"]
TARGET_HEADER = ["#", "Target", "Ratio", "Result"]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


@dataclass
class Report:
    title: str
    rows: list[Row]
    target_texts: dict[str, str]  # target label -> what it promises
    info: dict[str, str]
    settings: str
    checks: list[Check] = field(default_factory=list)

    def target_rows(self) -> list[list[str]]:
        return [
            [row.target.label, self.target_texts[row.target.label], f"{row.ratio():.2f}×", row.result()]
            for row in self.rows
            if row.target is not None
        ] + [
            [check.label, self.target_texts[check.label], f"{check.value():g} {check.unit}", check.result()]
            for check in self.checks
        ]

    def misses(self) -> int:
        return sum(1 for row in self.rows if row.result() == "MISS") + sum(
            1 for check in self.checks if check.result() == "MISS"
        )

    def text(self) -> str:
        info = "\n".join(f"  {key}: {value}" for key, value in self.info.items())
        return (
            f"\n{self.title}\n{'=' * len(self.title)}\n{info}\n  settings: {self.settings}\n\n"
            + text_table(RESULT_HEADER, [row.cells() for row in self.rows])
            + (
                "\n\n" + text_table(CHECK_HEADER, [check.cells() for check in self.checks])
                if self.checks
                else ""
            )
            + "\n\nTargets\n-------\n"
            + text_table(TARGET_HEADER, self.target_rows())
            + "\n"
        )

    def markdown(self) -> str:
        info = "\n".join(f"- **{key}**: {value}" for key, value in self.info.items())
        return (
            f"\n## {self.title}\n\n{info}\n- **settings**: {self.settings}\n\n"
            + markdown_table(RESULT_HEADER, [row.cells() for row in self.rows])
            + (
                "\n\n" + markdown_table(CHECK_HEADER, [check.cells() for check in self.checks])
                if self.checks
                else ""
            )
            + "\n\n### Targets\n\n"
            + markdown_table(TARGET_HEADER, self.target_rows())
            + "\n"
        )

    def emit(self, markdown: bool) -> None:
        print(self.text(), flush=True)
        if markdown:
            print("<!-- markdown -->" + self.markdown(), flush=True)
