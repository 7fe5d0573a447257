"""LoRA fine-tuning of catalog models as Slurm jobs, with the result stored and served."""
