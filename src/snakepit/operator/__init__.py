"""The Kubernetes operator: turns a ``SnakepitPool`` custom resource into a running pool.

``spec`` parses the resource, ``builders`` computes the desired child objects (pure functions),
``status`` derives conditions from the children, ``reconciler`` applies one pass, and
``handlers``/``main`` wire it all into kopf.
"""
