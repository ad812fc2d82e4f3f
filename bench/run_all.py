"""Run every benchmark script, one after the other, each in a process of its own.

    .venv/bin/python -m bench.run_all [--markdown] [--keep-cluster] [--reps 5] [--scale 1.0] [--strict]

The options are passed on to every script. Each script brings its servers up and down itself; a script
that fails does not stop the others. Exit status: 1 if a script failed (or, with --strict, missed a
target), 130 if interrupted, else 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

from . import harness

SCRIPTS = [
    "bench.bench_backend",
    "bench.bench_async_burst",
    "bench.bench_values",
    "bench.bench_tags",
    "bench.bench_models",
    "bench.bench_warming",
    "bench.bench_views",
    "bench.bench_shop",
]


def main(argv: list[str] | None = None) -> int:
    args = harness.common_parser(__spec__.name, __doc__.split("\n\n")[0]).parse_args(argv)
    child: subprocess.Popen | None = None

    def forward(signum: int, _frame: Any) -> None:
        # The child cleans up on SIGTERM/SIGHUP itself; we only wait for it.
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        raise KeyboardInterrupt

    for sig in harness.INTERRUPTING_SIGNALS:
        signal.signal(sig, forward)
    failed = []
    started = time.monotonic()
    for script in SCRIPTS:
        harness.log(f"running {script}")
        try:
            child = subprocess.Popen([sys.executable, "-m", script, *harness.forwarded_arguments(args)])
            status = child.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too (same process group): let it stop its servers.
            with harness.shielded():
                if child is not None:
                    child.wait()
            harness.log("interrupted")
            return 130
        if status != 0:
            failed.append(f"{script} (exit {status})")
    harness.log(f"all benchmarks done in {time.monotonic() - started:.0f}s")
    if failed:
        harness.log("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
