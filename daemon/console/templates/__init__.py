"""Jinja2 templates of the review console (package data, like probes_data)."""
