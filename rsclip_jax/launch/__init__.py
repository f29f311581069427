"""`rsclip launch`: thin launchers around JAX's own distributed runtime and the cluster's scheduler.

- `supervisor`: runs a job's processes here (local processes, or one `ssh` per host), keeps every
  process's log, streams process 0's, and takes the whole job down fast when one fails or hangs.
- `scripts`: the exact commands and scripts of each launcher (local, SLURM, TPU, hosts), as text, so
  `--dry-run` prints what would run and tests compare it byte for byte.
"""
