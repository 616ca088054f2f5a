"""deploy-prune: prune vision models to a latency budget measured on the target."""

__version__ = "0.1.0"
