"""Deployment: Docker images, compose stack, Prometheus, Grafana, operations docs."""
