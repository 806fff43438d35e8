"""Evaluation while and after training: representation diagnostics and samples."""
