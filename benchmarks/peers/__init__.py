"""The peer tools (mergekit, FusionBench): venvs.py makes their scratch venvs; the other files are driver scripts
that a peer venv's python runs with arguments, importing only the peer's packages (never distmerge)."""
