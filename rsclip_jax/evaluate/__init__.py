"""Evaluation of CLIP models on remote-sensing benchmarks."""
