"""The OpenAI-compatible gateway: routes requests to model instances running on Slurm."""
