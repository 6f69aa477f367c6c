"""Launchers (TPU VMs, SLURM, GKE notes), sweeps and ahead-of-time memory checks; run as `python -m launch.<tool>`."""
