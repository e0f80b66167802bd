"""Bundled sample traces (see README.md for origin and citations)."""
