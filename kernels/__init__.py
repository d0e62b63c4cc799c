"""Tensor math only (no processes, no files): model, optimizer steps, fill, metrics."""
