"""The runner's fork server preloads galore_bench.run.worker; nothing it imports may start CUDA (a process forked
after CUDA started cannot use it): bitsandbytes does at import, and peft imports bitsandbytes."""
from __future__ import annotations

import subprocess
import sys


def test_the_preloaded_worker_imports_neither_peft_nor_bitsandbytes():
    code = ("import sys, galore_bench.run.worker, galore_bench.run.sweep; "
            "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"
