"""Models: the catalog of presets and local models, and the offline tiny test model."""
