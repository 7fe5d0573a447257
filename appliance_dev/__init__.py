"""Development tooling, not shipped: the harness that starts the stack's parts for tests and
benchmarks."""
