"""Autoscaling: a pure policy (load history -> desired workers) and the loops that apply it.

``policy`` decides; ``local`` applies it to the worker processes of ``snakepit serve``; the
operator applies it to a pool's worker Deployment (``snakepit.operator.autoscaler``).
"""

# Health service a router reports NOT_SERVING on while it holds calls that no ready worker can
# run (a pool scaled to zero): autoscalers watch it to wake the pool at once, not at their next
# reading. The router's own health ("") stays SERVING meanwhile: holding calls is its job.
CAPACITY_SERVICE = "snakepit.capacity"
