"""The service side of kmd: settings, ledger, maintenance loop, HTTP API and CLI."""
