"""Write OCI image archives by hand (the pause image, the kind node's preloaded images).

The pod sandbox image must exist in containerd before the first pod starts. Writing it directly
keeps ``up`` independent of buildah and takes milliseconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from pathlib import Path


def _blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}", len(data)


def single_binary_image(binary: Path, dest: Path, name: str, entrypoint: str) -> Path:
    """An image whose root holds only ``binary`` at ``entrypoint``, named ``name`` (its
    ``ref.name`` is the tag alone: the local provider tags the import itself)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        layer = binary_layer(binary, Path(tmp) / "layer.tar", entrypoint)
        return layered_image(
            [layer], dest, name, entrypoint=[entrypoint], ref_name=name.rsplit(":", 1)[1]
        )


def _file_blob(tar: tarfile.TarFile, path: Path) -> tuple[str, int]:
    """Add a (possibly large) file as a blob without holding it in memory twice."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = path.stat().st_size
    with path.open("rb") as fh:
        tar.addfile(info, fh)
    return f"sha256:{digest}", info.size


def binary_layer(binary: Path, dest: Path, at: str) -> Path:
    """A layer (uncompressed tar) that holds only ``binary`` at ``at``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as layer:
        info = tarfile.TarInfo(at.lstrip("/"))
        info.size, info.mode = binary.stat().st_size, 0o755
        with binary.open("rb") as fh:
            layer.addfile(info, fh)
    return dest


def layered_image(
    layers: list[Path],
    dest: Path,
    name: str,
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
    ref_name: str | None = None,
) -> Path:
    """An OCI archive of ``layers`` (uncompressed tars, lowest first), named ``name``, with
    ``org.opencontainers.image.ref.name`` (default: ``name``) set so ``ctr images import``
    keeps the full name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        descriptors = []
        for layer in layers:
            digest, size = _file_blob(tar, layer)
            descriptors.append(
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest,
                    "size": size,
                }
            )
        image_config: dict[str, object] = {}
        if entrypoint:
            image_config["Entrypoint"] = entrypoint
        if env:
            image_config["Env"] = env
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": image_config,
                # An uncompressed layer's diff id is its digest.
                "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
            }
        ).encode()
        config_digest, config_size = _blob(tar, config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": config_size,
                },
                "layers": descriptors,
            }
        ).encode()
        manifest_digest, manifest_size = _blob(tar, manifest)
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": ref_name or name,
                    },
                }
            ],
        }
        for fname, doc in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index)):
            raw = json.dumps(doc).encode()
            info = tarfile.TarInfo(fname)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    tmp.replace(dest)
    return dest
