"""Stage 4: processes. A sweep spawns one process per run (or per rank) and is the only writer of records."""
from galore_bench.errors import quiet_noisy_loggers

quiet_noisy_loggers()  # a run's own process (fork server, torchrun rank) loads torchao through peft
