"""The kind provider's pure pieces: its kind config, pod network config, CoreDNS edit, and the
runc wrapper (built with the machine's Go and run against a stand-in runc)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from localkube.kind import cluster, nodeimage
from localkube.kind.settings import KindConfig

COREFILE = """.:53 {
    errors
    health {
       lameduck 5s
    }
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
    }
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30
    loop
}
"""


def test_corefile_loses_only_its_forward_block() -> None:
    edited = cluster.without_forward(COREFILE)
    assert "forward" not in edited and "max_concurrent" not in edited
    assert edited.count("{") == edited.count("}") == 3
    for kept in ("lameduck 5s", "pods insecure", "cache 30", "loop"):
        assert kept in edited


def test_kind_config_with_the_built_image_has_no_default_cni_and_the_node_count() -> None:
    kcfg = KindConfig(name="t")
    text = cluster.kind_config(kcfg, 3, f"{nodeimage.REPOSITORY}:v1.34.4-abc")
    assert text.count("- role: control-plane") == 1
    assert text.count("- role: worker") == 2
    assert text.count(f"image: {nodeimage.REPOSITORY}:v1.34.4-abc") == 3
    assert "disableDefaultCNI: true" in text
    assert "failCgroupV1: false" in text
    stock = cluster.kind_config(kcfg, 1, None)
    assert "image:" not in stock and "disableDefaultCNI" not in stock


def test_conflist_is_ptp_on_the_node_pod_cidr() -> None:
    conf = json.loads(cluster.conflist("10.244.2.0/24"))
    ptp, portmap = conf["plugins"]
    assert ptp["type"] == "ptp" and not ptp["ipMasq"]
    assert ptp["ipam"]["ranges"] == [[{"subnet": "10.244.2.0/24"}]]
    assert portmap["type"] == "portmap"


@pytest.fixture(scope="module")
def runcwrap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("go"):
        pytest.skip("needs Go to build the runc wrapper")
    src = tmp_path_factory.mktemp("runcwrap")
    shutil.copy(nodeimage.C.PACKAGE_DIR / "kind" / "runcwrap.go", src / "main.go")
    (src / "go.mod").write_text("module snakepit.local/runcwrap\n\ngo 1.24.0\n")
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    subprocess.run(["go", "build", "-o", "runcwrap", "."], cwd=src, env=env, check=True)
    return src / "runcwrap"


def _caps(*names: str) -> dict[str, list[str]]:
    return {s: list(names) for s in ("bounding", "effective", "permitted", "inheritable")}


def test_runcwrap_drops_the_capability_from_bundle_and_process_files(
    runcwrap: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "runc"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o755)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {
        "ociVersion": "1.0.2",
        "process": {"capabilities": _caps("CAP_SYS_ADMIN", "CAP_SYS_RESOURCE")},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    env = {**os.environ, "RUNCWRAP_RUNC": str(fake)}
    args = ["--root", "/run/x", "--log", "/tmp/l", "create", "--bundle", str(bundle), "id1"]
    subprocess.run([runcwrap, *args], env=env, check=True)
    edited = json.loads((bundle / "config.json").read_text())
    assert edited["process"]["capabilities"] == _caps("CAP_SYS_ADMIN")
    assert edited["ociVersion"] == "1.0.2"
    assert (tmp_path / "args").read_text().split() == args

    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sh"], "capabilities": _caps("CAP_SYS_RESOURCE")}))
    subprocess.run([runcwrap, "exec", "--process", str(process), "id1"], env=env, check=True)
    assert json.loads(process.read_text())["capabilities"] == _caps()
    # Anything else passes through untouched.
    subprocess.run([runcwrap, "state", "id1"], env=env, check=True)
    assert (tmp_path / "args").read_text().split() == ["state", "id1"]


def test_an_empty_cache_misses_every_kind_artefact_and_the_built_image_is_told_apart(
    tmp_path: Path,
) -> None:
    """What `build --provider kind --check` reports (scripts/test's cold-cache rule), and which
    clusters have no NetworkPolicy engine (the built image)."""
    from localkube.config import Config

    missing = nodeimage.missing(Config(cache_dir=tmp_path))
    assert missing[-1] == "node image"
    assert {"k8s", "kubeadm", "runcwrap", "kube-router"} <= set(missing)
    assert cluster.built_image({"image": f"{nodeimage.REPOSITORY}:v1.34.4-abc"})
    assert not cluster.built_image({"image": "kind default"})
