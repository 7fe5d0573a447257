"""The circuit breaker between the web tier and the cluster: one SSH ForceCommand entry point
that accepts a fixed, small grammar and can never run anything else."""
