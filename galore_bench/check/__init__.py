"""Stage 6: gates that exit 1: memory budgets and per-category comparisons."""
