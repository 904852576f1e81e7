"""Stage 4: processes. A sweep spawns one process per run (or per rank) and is the only writer of records."""
