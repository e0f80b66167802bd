"""Paths of the sample traces shipped in ``traces/data`` (origin and citations: its README.md)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
HPC2N_EXCERPT = DATA / "hpc2n-2002-excerpt.swf.gz"
AZURE2019 = DATA / "azure2019"
DAINT_UTILIZATION = DATA / "daint-utilization-2022-03.csv.gz"

# The HPC2N "Seth" cluster: 120 dual-CPU nodes (header MaxNodes/MaxProcs 240). Node memory is
# not in the trace; jobs used up to 900 MB per processor, so 2 GiB per node is assumed.
HPC2N_NODES = 120
HPC2N_CORES_PER_NODE = 2
HPC2N_MEMORY_PER_NODE = 2 * 1024**3
