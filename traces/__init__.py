"""Trace readers, usage and interference models, and the replay that drives policies/."""
