"""Installer: hardware detection, packages, Slurm config, preset models, self-check."""
