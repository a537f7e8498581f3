"""The real node's host bookkeeping: mount discovery and the pause image archive."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from e2e.cluster import host
from e2e.cluster.oci_archive import pack

MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:26 / /var/lib/kubetune-e2e/node/kubelet rw - ext4 /dev/vda rw
31 30 0:27 / /var/lib/kubetune-e2e/node/kubelet/pods/u1/volumes/token rw - tmpfs tmpfs rw
32 22 0:28 / /var/lib/kubetune-e2e-other rw - tmpfs tmpfs rw
33 22 0:29 / /var/lib/kubetune-e2e/with\\040space rw - tmpfs tmpfs rw
34 22 0:30 / /run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs rw - overlay overlay rw
"""


def test_mounts_under_finds_nested_mounts_deepest_first() -> None:
    found = host.mounts_under([Path("/var/lib/kubetune-e2e")], MOUNTINFO)
    assert found == [
        "/var/lib/kubetune-e2e/node/kubelet/pods/u1/volumes/token",
        "/var/lib/kubetune-e2e/node/kubelet",
        "/var/lib/kubetune-e2e/with space",
    ]


def test_mounts_under_ignores_siblings_with_the_same_prefix() -> None:
    assert "/var/lib/kubetune-e2e-other" not in host.mounts_under(
        [Path("/var/lib/kubetune-e2e")], MOUNTINFO
    )
    assert host.mounts_under([Path("/run/containerd")], MOUNTINFO) == [
        "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs"
    ]


def test_pause_archive_is_a_named_one_layer_image(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "pause").write_bytes(b"\x7fELF fake")
    (rootfs / "pause").chmod(0o755)
    out = tmp_path / "pause.tar"
    pack(rootfs, "localhost/kubetune/pause:test", "/pause", out)
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        (entry,) = manifest
        assert entry["RepoTags"] == ["localhost/kubetune/pause:test"]
        config = json.load(tar.extractfile(entry["Config"]))  # type: ignore[arg-type]
        assert config["config"]["Entrypoint"] == ["/pause"]
        with tarfile.open(fileobj=tar.extractfile(entry["Layers"][0])) as layer:
            member = layer.getmember("pause")
        assert member.mode & 0o111 and member.uid == 0 and member.mtime == 0
    # Reproducible: the same input gives the same archive.
    again = tmp_path / "again.tar"
    pack(rootfs, "localhost/kubetune/pause:test", "/pause", again)
    assert again.read_bytes() == out.read_bytes()
