"""Latency measurement: the timing protocol every measurement in deploy-prune goes through."""

from deploy_prune.latency.timing import Stats, measure, summarize

__all__ = ["Stats", "measure", "summarize"]
