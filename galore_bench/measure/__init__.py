"""Stage 3: the three engines (estimate, simulate, measure) and their instruments; they return typed results."""
