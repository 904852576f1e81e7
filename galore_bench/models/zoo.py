"""The LLaMA-1 model zoo: the GaLore paper's sizes built in code (no hub downloads), every number unchanged."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

GALORE_CONFIGS = ("GaLore repository configs/llama_*.json "
                  "(arXiv 2403.03507, Table 5; ../shared/reference/llama_configs.csv)")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Dimensions of a LLaMA-1-style decoder (RMSNorm, SwiGLU, untied embeddings, as many k/v heads as q heads)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int = 32000
    source: str = "explicit dimensions in the scenario"

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            use_cache=False,
        )


ZOO: dict[str, ModelShape] = {
    "tiny": ModelShape(64, 172, 2, 4, 512, source="galore-bench test model (not from a paper)"),
    "60m": ModelShape(512, 1376, 8, 8, source=GALORE_CONFIGS),
    "130m": ModelShape(768, 2048, 12, 12, source=GALORE_CONFIGS),
    "350m": ModelShape(1024, 2736, 24, 16, source=GALORE_CONFIGS),
    # The paper's Table 5 prints 24 heads / 32 layers for 1B; the repository config below is consistent.
    "1b": ModelShape(2048, 5461, 24, 32, source=GALORE_CONFIGS),
    "7b": ModelShape(4096, 11008, 32, 32, source=GALORE_CONFIGS + "; same as LLaMA-7B (arXiv 2302.13971)"),
    "13b": ModelShape(5120, 13824, 40, 40, source="LLaMA-13B (arXiv 2302.13971, Table 2)"),
    "30b": ModelShape(6656, 17920, 60, 52, source="LLaMA-33B (arXiv 2302.13971, Table 2)"),
    "65b": ModelShape(8192, 22016, 80, 64, source="LLaMA-65B (arXiv 2302.13971, Table 2)"),
}


def zoo_matrix_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(out, in) of each projected linear in one decoder layer: the matrices GaLore/LoRA act on."""
    h, i = shape.hidden_size, shape.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def zoo_parameter_count(shape: ModelShape) -> int:
    """Closed-form parameter count (checked against the built model in tests)."""
    per_layer = sum(a * b for a, b in zoo_matrix_shapes(shape).values()) + 2 * shape.hidden_size
    return 2 * shape.vocab_size * shape.hidden_size + shape.num_hidden_layers * per_layer + shape.hidden_size
