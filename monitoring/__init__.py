"""Monitoring at component, node, cluster and task level, exposed to Prometheus."""
