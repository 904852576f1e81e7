"""Stage 1: a scenario file becomes a validated, typed spec (runs, training settings, distribution)."""
