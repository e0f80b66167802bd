"""Slurm integration: Slurm access, the node agent, prolog/epilog hooks, SPANK plugin, dev cluster."""
