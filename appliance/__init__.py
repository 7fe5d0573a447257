"""appliance: a self-hosted AI stack that serves LLMs as Slurm jobs behind an OpenAI-compatible gateway."""

__version__ = "0.1.0"
