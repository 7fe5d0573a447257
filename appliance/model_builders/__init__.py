"""Models built offline by the project's own code: the tiny model the CPU demo serves (trained on
a built-in corpus) and a preset's architecture with random weights for GPU runs."""
