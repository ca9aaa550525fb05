"""The kind provider: a kind cluster on a user's Docker, or on a Docker started here by hand with a
node image built on this machine. See docs/local-cluster.md ("kind")."""
