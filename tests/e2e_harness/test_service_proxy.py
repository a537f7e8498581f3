"""Unit tests for the service proxy's listener computation (pure)."""

from __future__ import annotations

from typing import Any

from e2e.kubelet.proxy import desired_listeners

Obj = dict[str, Any]


def svc(ns: str, name: str, port: int, target: int | str, pname: str = "http") -> Obj:
    return {
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "clusterIP": "10.96.0.10",
            "ports": [{"name": pname, "port": port, "targetPort": target, "protocol": "TCP"}],
        },
    }


def slice_(ns: str, svc_name: str, port: int, ready: bool = True, pname: str = "http") -> Obj:
    return {
        "metadata": {
            "namespace": ns,
            "name": f"{svc_name}-abc",
            "labels": {"kubernetes.io/service-name": svc_name},
        },
        "ports": [{"name": pname, "port": port}],
        "endpoints": [{"addresses": ["192.0.2.2"], "conditions": {"ready": ready}}],
    }


def test_named_target_port_resolved_from_slices() -> None:
    services = {("a", "web"): svc("a", "web", 80, "http")}
    slices = {("a", "web-abc"): slice_("a", "web", 18080)}
    assert desired_listeners(services, slices) == {80: ("a", "web", "http", [("192.0.2.2", 18080)])}


def test_same_port_needs_no_listener() -> None:
    services = {("a", "web"): svc("a", "web", 8080, 8080)}
    slices = {("a", "web-abc"): slice_("a", "web", 8080)}
    assert desired_listeners(services, slices) == {}


def test_unready_endpoints_are_not_backends() -> None:
    services = {("a", "web"): svc("a", "web", 80, 8080)}
    slices = {("a", "web-abc"): slice_("a", "web", 8080, ready=False)}
    assert desired_listeners(services, slices) == {}


def test_headless_and_port_clash() -> None:
    headless = svc("a", "h", 81, 9000)
    headless["spec"]["clusterIP"] = "None"
    services = {
        ("a", "h"): headless,
        ("a", "one"): svc("a", "one", 90, 9001),
        ("b", "two"): svc("b", "two", 90, 9002),
    }
    slices = {
        ("a", "one-abc"): slice_("a", "one", 9001),
        ("b", "two-abc"): slice_("b", "two", 9002),
    }
    want = desired_listeners(services, slices)
    assert set(want) == {90}
    assert want[90][:2] == ("a", "one")  # first (sorted) wins the clash


def test_kubernetes_service_goes_to_the_apiserver() -> None:
    k = svc("default", "kubernetes", 443, 6443, pname="https")
    got = desired_listeners({("default", "kubernetes"): k}, {}, ("127.0.0.1", 6443))
    assert got == {443: ("default", "kubernetes", "https", [("127.0.0.1", 6443)])}


def test_loopback_fallback_when_slices_are_empty() -> None:
    services = {("a", "web"): svc("a", "web", 80, 8080)}
    assert desired_listeners(services, {}, loopback_fallback=True) == {
        80: ("a", "web", "http", [("127.0.0.1", 8080)])
    }
    assert desired_listeners(services, {}) == {}
