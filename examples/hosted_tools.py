"""An application that hosts a tool of its own, ``lookup_price``, for the pool's Python tools.

The pool's ``quote`` tool prices a basket by calling ``lookup_price`` for each item through
``ctx.call_tool``; the call comes back to this process over the stream the client keeps open to
the router, so this process needs no open port and may sit outside the cluster, behind NAT.

    snakepit serve &                      # or any pool running the showcase adapter
    python examples/hosted_tools.py [HOST:PORT]
"""

from __future__ import annotations

import sys

from snakepit import Client

PRICES = {"apple": 0.5, "pear": 0.75, "fig": 1.25}


def lookup_price(item: str) -> float:
    """The application's own data (a dict here; its database in real life)."""
    if item not in PRICES:
        raise LookupError(f"no price for {item!r}")
    return PRICES[item]


def main(target: str = "localhost:50051") -> None:
    with Client(target, timeout=30) as client, client.session() as session:
        handle = client.register_tool("lookup_price", lookup_price, description="Unit price")
        print(session.execute("quote", items={"apple": 4, "fig": 2}))
        handle.unregister()


if __name__ == "__main__":
    main(*sys.argv[1:])
