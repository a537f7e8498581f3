"""A tiny kube-proxy for the process cluster: Service ports on 127.0.0.1.

ClusterIPs are not routable here (there is no iptables/IPVS programming), so
the kubelets map every Service name to 127.0.0.1 in each pod's hosts file,
and this proxy makes ``<service>:<port>`` answer there: for each TCP port of
a ClusterIP Service it listens on ``127.0.0.1:<port>`` and forwards each
connection to a ready endpoint from the Service's EndpointSlices.

Pods are host processes: when a Service's port equals its target port the
pod itself already listens there, so no listener is opened (it would take
the pod's port). Two Services using the same port number cannot both be
served; the first one wins and the clash is logged. It authenticates as
``system:kube-proxy`` (the ``system:node-proxier`` role), as kube-proxy does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import httpx

from e2e.kube import Api, ApiError

Obj = dict[str, Any]


def desired_listeners(
    services: dict[tuple[str, str], Obj],
    slices: dict[tuple[str, str], Obj],
    apiserver: tuple[str, int] | None = None,
    loopback_fallback: bool = False,
) -> dict[int, tuple[str, str, str, list[tuple[str, int]]]]:
    """Compute ``listen port -> (namespace, service, port name, backends)``.

    Backends are the ready endpoint addresses with the target port the
    EndpointSlice controller resolved (named target ports included). The
    ``default/kubernetes`` Service has no endpoints here (the API server is
    on loopback, which Endpoints may not hold), so it forwards to
    ``apiserver`` directly. With ``loopback_fallback`` (nodes whose IP is
    127.0.0.1: the API refuses loopback endpoints, so slices stay empty) a
    numeric target port is forwarded to 127.0.0.1, where host-network pods
    listen.
    """
    result: dict[int, tuple[str, str, str, list[tuple[str, int]]]] = {}
    for (ns, name), svc in sorted(services.items()):
        spec = svc.get("spec", {})
        if spec.get("clusterIP") in (None, "", "None") or spec.get("type") == "ExternalName":
            continue
        for port in spec.get("ports", []) or []:
            if port.get("protocol", "TCP") != "TCP":
                continue
            pname = port.get("name", "")
            backends: list[tuple[str, int]] = []
            for sl in slices.values():
                meta = sl["metadata"]
                if (
                    meta["namespace"] != ns
                    or meta.get("labels", {}).get("kubernetes.io/service-name") != name
                ):
                    continue
                target = next(
                    (p.get("port") for p in sl.get("ports") or [] if p.get("name", "") == pname),
                    None,
                )
                if target is None:
                    continue
                for ep in sl.get("endpoints") or []:
                    if (ep.get("conditions") or {}).get("ready", True):
                        backends.extend((addr, int(target)) for addr in ep["addresses"])
            if (ns, name) == ("default", "kubernetes") and apiserver:
                backends = [apiserver]
            target_port = port.get("targetPort", port["port"])
            if not backends and loopback_fallback and isinstance(target_port, int):
                backends = [("127.0.0.1", target_port)]
            if isinstance(target_port, int) and target_port == port["port"]:
                continue  # the pod itself serves this port on the host network
            if not backends:
                # Nothing to forward to: a real kube-proxy rejects such
                # connections, and a listener here could hold the very port a
                # host-network pod behind a named targetPort is about to bind.
                continue
            if backends and all(b[1] == port["port"] for b in backends):
                continue
            if port["port"] in result:
                continue
            result[port["port"]] = (ns, name, pname, backends)
    return result


class ServiceProxy:
    """Watches Services and EndpointSlices and runs the listeners.

    Args:
        api: Client with kube-proxy credentials.
        log: Line printer.
    """

    def __init__(
        self, api: Api, log: Callable[[str], None], loopback_fallback: bool = False
    ) -> None:
        self.api = api
        self.loopback_fallback = loopback_fallback
        self.log = log
        self.lock = threading.Lock()
        self.services: dict[tuple[str, str], Obj] = {}
        self.slices: dict[tuple[str, str], Obj] = {}
        self.loop = asyncio.new_event_loop()
        self.servers: dict[int, asyncio.Server] = {}
        self.backends: dict[int, list[tuple[str, int]]] = {}
        self.rr: dict[int, itertools.count[int]] = {}
        self.stopping = threading.Event()
        url = urlparse(api.server)
        self.apiserver = (url.hostname or "127.0.0.1", url.port or 443)

    def _watch(self, path: str, store: dict[tuple[str, str], Obj]) -> None:
        while not self.stopping.is_set():
            try:
                lst = self.api.get(path)
                with self.lock:
                    store.clear()
                    for o in lst["items"]:
                        store[(o["metadata"]["namespace"], o["metadata"]["name"])] = o
                self._kick()
                for ev in self.api.watch(path, lst["metadata"]["resourceVersion"]):
                    if ev["type"] == "ERROR":
                        break
                    if ev["type"] == "BOOKMARK":
                        continue
                    o = ev["object"]
                    key = (o["metadata"]["namespace"], o["metadata"]["name"])
                    with self.lock:
                        if ev["type"] == "DELETED":
                            store.pop(key, None)
                        else:
                            store[key] = o
                    self._kick()
            except (ApiError, httpx.HTTPError, KeyError, ValueError) as exc:
                self.log(f"watch {path} restarting: {exc}")
                time.sleep(1.0)

    def _kick(self) -> None:
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._reconcile()))

    async def _reconcile(self) -> None:
        with self.lock:
            want = desired_listeners(
                self.services, self.slices, self.apiserver, self.loopback_fallback
            )
        for port in list(self.servers):
            if port not in want:
                self.servers.pop(port).close()
                self.log(f"closed 127.0.0.1:{port}")
        for port, (ns, name, _pname, backends) in want.items():
            self.backends[port] = backends
            if port in self.servers:
                continue
            try:
                self.servers[port] = await asyncio.start_server(
                    functools.partial(self._forward, port), "127.0.0.1", port
                )
                self.rr[port] = itertools.count()
                self.log(f"service {ns}/{name} on 127.0.0.1:{port}")
            except OSError as exc:
                self.log(f"cannot serve {ns}/{name} on 127.0.0.1:{port}: {exc}")

    async def _forward(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        backends = self.backends.get(port) or []
        if not backends:
            writer.close()  # no ready endpoint: refuse, as a Service without endpoints does
            return
        host, target = backends[next(self.rr[port]) % len(backends)]
        try:
            up_reader, up_writer = await asyncio.open_connection(host, target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def run(self) -> None:
        """Serve until SIGTERM (blocks)."""
        for path, store in (
            ("/api/v1/services", self.services),
            ("/apis/discovery.k8s.io/v1/endpointslices", self.slices),
        ):
            threading.Thread(target=self._watch, args=(path, store), daemon=True).start()
        self.loop.add_signal_handler(signal.SIGTERM, self.loop.stop)
        self.loop.add_signal_handler(signal.SIGINT, self.loop.stop)
        self.loop.run_forever()
        self.stopping.set()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m e2e.kubelet.proxy --kubeconfig ...``."""
    p = argparse.ArgumentParser(prog="python -m e2e.kubelet.proxy", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument(
        "--loopback-fallback",
        action="store_true",
        help="forward to 127.0.0.1:<targetPort> when a Service has no endpoints",
    )
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} service-proxy {msg}", file=sys.stderr, flush=True)

    ServiceProxy(Api.from_kubeconfig(args.kubeconfig), log, args.loopback_fallback).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
