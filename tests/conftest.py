"""Fixtures shared by every test directory; each plugin module owns one kind of real component."""

pytest_plugins = [
    "tests.fixtures.processes",
    "tests.fixtures.redis",
    "tests.fixtures.kube",
    "tests.fixtures.prometheus",
    "tests.fixtures.jaeger",
    "tests.e2e.report",
]
