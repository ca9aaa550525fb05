"""Fresh certificates, service-account keys and kubeconfigs for every cluster, made with openssl.

One private CA signs everything (apiserver serving cert, kubelet serving and client certs, one
client cert per component). EC P-256 keys keep generation to a few milliseconds each.
"""

from __future__ import annotations

import base64
import json
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .run import run, write_file

CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
DAYS = "365"


@dataclass(frozen=True)
class Identity:
    """A client (or client+server) certificate: file stem, common name, organisations, SANs."""

    stem: str
    cn: str
    orgs: tuple[str, ...] = ()
    sans: tuple[str, ...] = ()
    server: bool = False


def _subject(cn: str, orgs: tuple[str, ...]) -> str:
    return "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"


def make_ca(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-new",
            "-nodes",
            *CURVE,
            "-keyout",
            pki / "ca.key",
            "-out",
            pki / "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=snakepit-local-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
        quiet=True,
    )
    (pki / "ca.key").chmod(0o600)


def make_cert(pki: Path, ident: Identity) -> None:
    key, csr, crt = (pki / f"{ident.stem}.{ext}" for ext in ("key", "csr", "crt"))
    run(
        [
            "openssl",
            "req",
            "-new",
            "-nodes",
            *CURVE,
            "-keyout",
            key,
            "-out",
            csr,
            "-subj",
            _subject(ident.cn, ident.orgs),
        ],
        quiet=True,
    )
    key.chmod(0o600)
    usage = "serverAuth,clientAuth" if ident.server else "clientAuth"
    ext = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
    ]
    if ident.sans:
        ext.append("subjectAltName=" + ",".join(ident.sans))
    with tempfile.NamedTemporaryFile("w", suffix=".cnf") as extfile:
        extfile.write("\n".join(ext) + "\n")
        extfile.flush()
        run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                csr,
                "-CA",
                pki / "ca.crt",
                "-CAkey",
                pki / "ca.key",
                "-set_serial",
                "0x" + secrets.token_hex(16),
                "-days",
                DAYS,
                "-out",
                crt,
                "-extfile",
                extfile.name,
            ],
            quiet=True,
        )
    csr.unlink()


def make_service_account_keys(pki: Path) -> None:
    run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", pki / "sa.key"],
        quiet=True,
    )
    (pki / "sa.key").chmod(0o600)
    run(["openssl", "ec", "-in", pki / "sa.key", "-pubout", "-out", pki / "sa.pub"], quiet=True)


def identities(cfg: Config) -> list[Identity]:
    node, net = cfg.node_name, cfg.net
    apiserver_sans = (
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
        "DNS:localhost",
        f"DNS:{node}",
        "IP:127.0.0.1",
        f"IP:{net.kubernetes_service_ip}",
        f"IP:{cfg.node_ip}",
    )
    return [
        Identity("apiserver", "kube-apiserver", sans=apiserver_sans, server=True),
        Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
        Identity("admin", "kubernetes-admin", ("system:masters",)),
        Identity("controller-manager", "system:kube-controller-manager"),
        Identity("scheduler", "system:kube-scheduler"),
        Identity("kube-proxy", "system:kube-proxy"),
        Identity("kubelet", f"system:node:{node}", ("system:nodes",)),
        Identity(
            "kubelet-serving",
            node,
            sans=(f"DNS:{node}", "DNS:localhost", "IP:127.0.0.1", f"IP:{cfg.node_ip}"),
            server=True,
        ),
        # Users bound by manifests/rbac.yaml to exactly what they need.
        Identity("coredns", "snakepit:coredns"),
        Identity("provisioner", "snakepit:provisioner"),
        Identity("kube-router", "snakepit:kube-router"),
    ]


def kubeconfig(cfg: Config, stem: str) -> str:
    """A kubeconfig with the CA and the client cert embedded, so it can be copied anywhere."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    pki = cfg.pki_dir
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "snakepit-local",
                "cluster": {
                    "server": cfg.server_url,
                    "certificate-authority-data": b64(pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": stem,
                "user": {
                    "client-certificate-data": b64(pki / f"{stem}.crt"),
                    "client-key-data": b64(pki / f"{stem}.key"),
                },
            }
        ],
        "contexts": [
            {"name": "snakepit-local", "context": {"cluster": "snakepit-local", "user": stem}}
        ],
        "current-context": "snakepit-local",
    }
    return json.dumps(doc, indent=2) + "\n"  # JSON is valid YAML; no PyYAML needed


def kubeconfig_path(cfg: Config, stem: str) -> Path:
    return cfg.state_dir / "kubeconfigs" / f"{stem}.kubeconfig"


def generate(cfg: Config) -> None:
    """Create the CA, every certificate, the SA keys and one kubeconfig per client identity."""
    pki = cfg.pki_dir
    make_ca(pki)
    make_service_account_keys(pki)
    for ident in identities(cfg):
        make_cert(pki, ident)
        if not ident.server:
            write_file(kubeconfig_path(cfg, ident.stem), kubeconfig(cfg, ident.stem), 0o600)
    write_file(cfg.admin_kubeconfig, kubeconfig(cfg, "admin"), 0o600)
