"""Models: the catalog of presets and local models, and what an instance of one asks Slurm for."""
