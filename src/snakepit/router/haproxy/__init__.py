"""HAProxy as the router's data path for tool calls (see docs/architecture.md).

``config`` builds haproxy.cfg from a spec (pure), ``runtime`` talks to its runtime API,
``servers`` keeps its worker servers current, ``process`` runs it, ``router`` puts it in front
of the Python router, which keeps serving every other RPC.
"""
