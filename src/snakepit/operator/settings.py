"""kopf settings for running in production (applied from an ``@kopf.on.startup`` handler)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any


def configure(settings: Any, clusterwide: bool) -> None:
    """Tune kopf for a long-running, single-replica operator.

    - Watches: ask the server to end each watch after 5 minutes (a fresh list+watch heals any
      stream a proxy silently broke) and give up client-side shortly after; bookmarks and the
      inactivity timeout catch stalls in between.
    - Requests: bounded, so a hung API call cannot freeze a handler forever.
    - Events: kopf posts only warnings and errors from handlers; the reconciler posts its own
      events for condition transitions.
    - Scanning (watching CRDs/namespaces at runtime) only when cluster-wide: a namespaced
      install has no cluster-scoped permissions, and the namespaces it serves are explicit.
    - Persistence: our handlers are event handlers that keep no per-object progress, so kopf
      never writes annotations or finalizers onto pools; the finalizer name is still ours in
      case a future handler needs one.
    """
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "snakepit-operator"
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    settings.scanning.disabled = not clusterwide
    settings.persistence.finalizer = "snakepit.dev/operator"
