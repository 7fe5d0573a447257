"""appliance: a self-hosted AI stack serving LLMs as Slurm jobs behind an OpenAI-compatible API."""

__version__ = "0.1.0"
