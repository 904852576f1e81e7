"""Our trace of single transformers modules against Liger-Kernel's published GPU peaks (a few rows re-derived).

Published: github.com/linkedin/Liger-Kernel benchmark/data/all_benchmark_data.csv (A100-SXM4-80GB,
`torch.cuda.max_memory_allocated`, MiB), as transcribed in ../shared/reference/external/liger_kernel_modules.csv;
the full table is reports/cpu-simulate/liger_modules.md (python -m galore_bench.report.external_modules).
"""
from __future__ import annotations

import pytest
import torch

from galore_bench.measure.module_peaks import traced_peak
from galore_bench.report.external_modules import WORKSPACE_BELOW_SM90, compare

MIB = 2**20
ROWS = [  # module, config_dims, x name, x value, published MiB, GEMM threads the trace must find
    ("cross_entropy", {"B": 8, "T": 2048}, "V", 131072, 40960.125, ()),
    ("fused_linear_cross_entropy", {"H": 4096, "V": 128256, "dtype": "torch.bfloat16"}, "BT", 4096, 6092.2822265625,
     ("backward", "caller")),
    ("rms_norm", {"M": 2048, "dtype": "torch.bfloat16", "eps": 1e-06}, "H", 4096, 320.0546875, ()),
    ("swiglu", {"B": 4, "hidden_size": 4096, "dtype": "torch.bfloat16", "intermediate_size": 11008,
                "hidden_act": "silu"}, "T", 1024, 1294.25, ("backward", "caller")),
    ("rope", {"dtype": "torch.bfloat16", "seq_len": 2048, "num_q_heads": 32, "num_kv_heads": 8}, "H", 512,
     22.26611328125, ("caller",)),
]


@pytest.mark.parametrize(("module", "config", "x_name", "x", "published", "gemms"), ROWS,
                         ids=[f"{r[0]}-{r[2]}{r[3]}" for r in ROWS])
def test_trace_plus_cublas_workspaces_is_the_published_peak(module, config, x_name, x, published, gemms):
    """Cross-entropy and RMSNorm to the byte; the GEMM modules short by one 8.125 MiB cuBLAS workspace per
    thread that ran a GEMM; RoPE's 8 bytes per position (16 KiB here) are the known remainder."""
    traced = traced_peak(module, config, x, x_name)
    assert traced.gemm_contexts == gemms
    with_workspaces = traced.peak_bytes + len(gemms) * WORKSPACE_BELOW_SM90
    remainder = 2048 * 8 if module == "rope" else 0
    # the benchmark takes its median in float32 MiB (torch.quantile): 1/256 MiB resolution at 40960 MiB
    as_published = torch.tensor((with_workspaces + remainder) / MIB, dtype=torch.float32).item()
    assert abs(published - as_published) < 1024 / MIB, (traced.peak_bytes / MIB, published)


def test_a_row_beyond_five_percent_names_its_cause():
    row = {"model": "single module: rope (huggingface provider)", "kernel_operation_mode": "full",
           "config_dims": '{"dtype":"torch.bfloat16","seq_len":2048,"num_q_heads":32,"num_kv_heads":8}',
           "x_name": "H", "x_value": "512", "value": "22.26611328125", "gpu": "NVIDIA A100-SXM4-80GB",
           "script_commit": "b5672a15"}
    result = compare(row)
    assert result["error_pct"] == pytest.approx(-36.56, abs=0.01)
    assert "1 cuBLAS workspace(s) of 8.125 MiB" in result["cause"]
    assert abs(result["error_with_workspaces_pct"]) < 0.1
