"""Subcommand groups of the `kmd` CLI, one module per concern."""
