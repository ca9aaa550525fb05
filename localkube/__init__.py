"""A real single-node Kubernetes, built and run on this machine for the end-to-end tests.

No Docker engine and no registry are assumed: the Kubernetes binaries are compiled from their Go
modules into a cache outside the clone, every component runs as a plain background process with a
PID file and a log file, and images are built with buildah and imported into containerd.

Entry points: ``scripts/local-cluster`` (``python -m localkube``) and the pytest plugin
``tests.fixtures.kube``. See ``docs/local-cluster.md``.
"""
