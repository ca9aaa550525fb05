"""Autoscaling: a pure policy (load history -> desired workers) and the loops that apply it.

``policy`` decides; ``local`` applies it to the worker processes of ``snakepit serve``; the
operator applies it to a pool's worker Deployment (``snakepit.operator.autoscaler``).
"""
