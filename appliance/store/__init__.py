"""The model store: encrypted, loading-optimised checkpoints, their loader and tiers."""
