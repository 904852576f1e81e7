"""Optimizers and training-step mechanics of the measured methods (our own implementations)."""
