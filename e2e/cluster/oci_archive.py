"""Pack a directory as a one-layer image archive that `ctr images import` takes.

Used for the pause (sandbox) image only: a single static binary, so no image
builder is worth requiring for it. The archive is in the docker-archive layout
(`manifest.json` with `RepoTags`), which containerd imports under that name.

Usage: python oci_archive.py ROOTFS IMAGE_NAME ENTRYPOINT OUT.tar
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path


def _layer(rootfs: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            # Reproducible: the same binary gives the same image digest.
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def pack(rootfs: Path, name: str, entrypoint: str, out: Path) -> None:
    """Write ``rootfs`` as image ``name`` running ``entrypoint`` to the archive ``out``."""
    layer = _layer(rootfs)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": [entrypoint], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [name], "Layers": ["layer.tar"]}]
    ).encode()
    with tarfile.open(out, mode="w") as tar:
        for arcname, data in (
            ("layer.tar", layer),
            (config_name, config),
            ("manifest.json", manifest),
        ):
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    pack(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
