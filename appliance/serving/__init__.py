"""Model instances: Slurm batch jobs that run one model server each, and their lifecycle."""
