"""The review console's stylesheet (package data)."""
