"""Connection options against real servers: TLS (rediss://), ACL users, reads from replicas."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from django_distcache.devcluster import find_server_binary
from tests.conftest import make_cache, wait_replicas_listed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_cluster(tmp_path):
    """A one-node Redis Cluster that speaks only TLS, with a CA and a certificate made for the test."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test's TLS certificates and is not on PATH")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        # Python >= 3.13 verifies strictly (VERIFY_X509_STRICT): a CA needs these extensions.
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=tmp_path,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=tmp_path,
    )
    (tmp_path / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
        cwd=tmp_path,
    )
    log = tmp_path / "server.log"

    def start_server() -> tuple[int, subprocess.Popen]:
        port = _free_port()
        arguments = {
            "--port": "0", "--tls-port": str(port), "--bind": "127.0.0.1",
            "--tls-cert-file": "server.crt", "--tls-key-file": "server.key", "--tls-ca-cert-file": "ca.crt",
            "--tls-auth-clients": "no", "--tls-cluster": "yes", "--cluster-enabled": "yes",
            "--cluster-config-file": "nodes.conf", "--save": "", "--appendonly": "no", "--dir": str(tmp_path),
        }  # fmt: skip
        command = [find_server_binary()] + [part for pair in arguments.items() for part in pair]
        with log.open("a") as output:
            return port, subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)

    # The port is free when chosen but another process may take it before the server binds it: retry.
    for _ in range(3):
        port, process = start_server()
        time.sleep(0.2)
        if process.poll() is None:
            break
    else:
        pytest.fail("the TLS server would not start: " + log.read_text()[-2000:])
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        ssl=True,
        ssl_ca_certs=str(tmp_path / "ca.crt"),
        retry=Retry(NoBackoff(), 0),
    )
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, log.read_text()[-2000:]
                time.sleep(0.05)
        else:
            pytest.fail("the TLS server did not answer: " + log.read_text()[-2000:])
        client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        for _ in range(100):
            info = client.execute_command("CLUSTER INFO")
            if "cluster_state:ok" in str(info) or (
                isinstance(info, dict) and info.get("cluster_state") == "ok"
            ):
                break
            time.sleep(0.05)
        yield port, str(tmp_path / "ca.crt")
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def test_tls_cluster_through_rediss_urls(tls_cluster):
    port, ca = tls_cluster
    cache = make_cache(LOCATION=f"rediss://127.0.0.1:{port}", OPTIONS={"SSL": {"ssl_ca_certs": ca}})
    cache.set("k", {"secure": True})
    assert cache.get("k") == {"secure": True}
    assert cache.get_many(["k", "x"]) == {"k": {"secure": True}}


def test_tls_refuses_an_untrusted_server(tls_cluster):
    port, _ = tls_cluster
    cache = make_cache(LOCATION=f"rediss://127.0.0.1:{port}", OPTIONS={"FAILURE_POLICY": "raise"})
    with pytest.raises(Exception, match="certificate|unreachable"):
        cache.get("k")


@pytest.fixture
def acl_user(cluster):
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    # An ACL user exists per node, so create it on every node (replicas too).
    nodes = [redis.Redis(port=port) for port in cluster.ports]
    for node in nodes:
        node.execute_command("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "+@all")
    yield "app", "s3cret"
    for node in nodes:
        node.execute_command("ACL", "DELUSER", "app")
        node.close()
    client.close()


def test_acl_username_and_password(acl_user, settings):
    username, password = acl_user
    location = [
        url.replace("redis://", f"redis://{username}:{password}@") for url in settings.CLUSTER_LOCATION
    ]
    cache = make_cache(LOCATION=location)
    cache.set("k", "v")
    assert cache.get("k") == "v"
    options = make_cache(OPTIONS={"USERNAME": username, "PASSWORD": password})
    options.set("k", "w")
    assert options.get("k") == "w"


def test_acl_wrong_password_is_reported(acl_user, settings):
    location = [url.replace("redis://", "redis://app:wrong@") for url in settings.CLUSTER_LOCATION]
    cache = make_cache(LOCATION=location, OPTIONS={"FAILURE_POLICY": "raise"})
    with pytest.raises(Exception, match="(?i)invalid username-password|WRONGPASS|auth"):
        cache.get("k")


def test_read_from_replicas_reads_are_served_by_replicas(cluster):
    wait_replicas_listed(cluster)
    cache = make_cache(OPTIONS={"READ_FROM_REPLICAS": True})
    replica_ports = cluster.replica_ports

    def replica_gets() -> int:
        total = 0
        for port in replica_ports:
            stats = redis.Redis(port=port).info("commandstats")
            total += stats.get("cmdstat_get", {}).get("calls", 0)
        return total

    cache.set_many({f"k{i}": i for i in range(30)})
    deadline = time.monotonic() + 5
    before = replica_gets()
    while time.monotonic() < deadline:  # replication is asynchronous: wait until the replicas have it
        if cache.get_many([f"k{i}" for i in range(30)]) == {f"k{i}": i for i in range(30)}:
            break
        time.sleep(0.05)
    assert cache.get("k1") == 1
    assert replica_gets() > before
    cache.set("k1", "written to the primary")  # writes still go to primaries


# The async methods open connections of their own (topology/multiplex.py): TLS, AUTH and READONLY again.


async def test_async_tls_cluster_through_rediss_urls(tls_cluster):
    port, ca = tls_cluster
    cache = make_cache(LOCATION=f"rediss://127.0.0.1:{port}", OPTIONS={"SSL": {"ssl_ca_certs": ca}})
    await cache.aset("k", {"secure": True})
    assert await cache.aget("k") == {"secure": True}
    assert await cache.aget_many(["k", "x"]) == {"k": {"secure": True}}


async def test_async_tls_refuses_an_untrusted_server(tls_cluster):
    port, _ = tls_cluster
    cache = make_cache(LOCATION=f"rediss://127.0.0.1:{port}", OPTIONS={"FAILURE_POLICY": "raise"})
    with pytest.raises(Exception, match="certificate|unreachable"):
        await cache.aget("k")


async def test_async_acl_username_and_password(acl_user, settings):
    username, password = acl_user
    # A socket timeout of its own: caches of the same settings share breakers, and the sync ACL tests'
    # teardown (ACL DELUSER) makes their invalidation channel fail to log in again, which counts.
    cache = make_cache(OPTIONS={"USERNAME": username, "PASSWORD": password, "SOCKET_TIMEOUT": 0.3})
    await cache.aset("k", "w")
    assert await cache.aget("k") == "w"
    wrong = make_cache(OPTIONS={"USERNAME": username, "PASSWORD": "wrong", "FAILURE_POLICY": "raise"})
    with pytest.raises(Exception, match="(?i)invalid username-password|WRONGPASS|auth"):
        await wrong.aget("k")


async def test_async_reads_from_replicas_are_served_by_replicas(cluster):
    import asyncio

    wait_replicas_listed(cluster)
    cache = make_cache(OPTIONS={"READ_FROM_REPLICAS": True})

    def replica_gets() -> int:
        return sum(
            redis.Redis(port=port).info("commandstats").get("cmdstat_get", {}).get("calls", 0)
            for port in cluster.replica_ports
        )

    values = {f"r{i}": i for i in range(30)}
    await cache.aset_many(values)
    before = replica_gets()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # replication is asynchronous: wait until the replicas have it
        if await asyncio.gather(*(cache.aget(key) for key in values)) == list(values.values()):
            break
        await asyncio.sleep(0.05)
    assert await cache.aget("r1") == 1
    assert replica_gets() > before  # READONLY was sent: replicas answered instead of redirecting
