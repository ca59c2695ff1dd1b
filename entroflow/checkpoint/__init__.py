"""Checkpoint stages: the ΔH estimate and the Fisher kernel of a training run's checkpoints."""
