"""Fixtures shared by every test directory; each plugin module owns one kind of real component."""

pytest_plugins = [
    "tests.fixtures.processes",
    "tests.fixtures.redis",
    "tests.e2e.cluster.fixtures",
    "tests.e2e.report",
]
