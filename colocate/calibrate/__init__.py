"""``colocate calibrate``: measure on a real node how much functions on a batch job's idle
cores slow the job, and write the table the replay and the guard read
(:mod:`policies.interference`).

- :mod:`colocate.calibrate.kernels`: the batch-job kernels (STREAM triad, dense matmul,
  pointer chase), run as Slurm jobs with ``python -m colocate.calibrate.kernels KIND``;
- :mod:`colocate.calibrate.functions`: the functions leased on the idle core (compression,
  BFS, image work) and ``idle`` (the alone windows);
- :mod:`colocate.calibrate.runner`: submits the jobs, leases through the broker, runs the
  functions through the Client and turns the kernels' timings into the table;
- :mod:`colocate.calibrate.stats`: per-repeat slowdowns to means and t-intervals (pure).
"""
