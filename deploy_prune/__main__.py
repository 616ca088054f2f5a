"""``python -m deploy_prune``: the CLI (``compare`` runs each method this way, in its own process)."""

from deploy_prune.cli import app

if __name__ == "__main__":
    app()
