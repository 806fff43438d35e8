"""Evaluation while and after training: representation diagnostics and samples, and the cache
of the modalities' fixed prompt evaluators."""
