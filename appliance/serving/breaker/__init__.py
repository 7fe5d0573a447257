"""The circuit breaker between the web tier and the cluster: one SSH ForceCommand entry point
that accepts a fixed, small grammar (grammar.py) and can never run anything else; what each
command does on the cluster (actions.py) and the gateway's side (client.py)."""
