"""Any decoder transformers builds from a config: a user's config.json or a shipped preset (published configs).

The description carries the config itself, as canonical JSON, so it stays frozen and hashable like the zoo's
ModelShape (scenarios and runs carry it across processes); the dimensions the engines read are properties of it.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, PretrainedConfig

PRESETS_FOLDER = resources.files("galore_bench.models") / "presets"
ATTENTION = ("sdpa", "eager", "flash_attention_2")
NOT_CONFIG = ("_source", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "cache_implementation")
"""Keys of a config.json that say where it came from or how it generates, not what the model is."""
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


class ModelInputError(ValueError):
    """A config or preset that cannot be used: (field, got, allowed) for the scenario's problem list."""

    def __init__(self, field: str, got: Any, allowed: str) -> None:
        super().__init__(f"{field}: got {got!r}, allowed {allowed}")
        self.field, self.got, self.allowed = field, got, allowed


@dataclass(frozen=True, slots=True)
class HFModel:
    """A transformers causal LM given by its config (GQA, head_dim, tied embeddings, biases, q/k norms, MoE...)."""

    config_json: str
    source: str
    preset: str = ""
    attn_implementation: str = "sdpa"
    attn_note: str = ""
    """Why the attention implementation is not the requested/default one (a family without sdpa)."""

    @property
    def settings(self) -> PretrainedConfig:
        """The family's config with its defaults filled in (shared: never mutate it; `config()` is a copy)."""
        return _reference_config(self.config_json)

    @property
    def model_type(self) -> str:
        return str(self.settings.model_type)

    @property
    def hidden_size(self) -> int:
        return int(self.settings.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return int(self.settings.intermediate_size)

    @property
    def num_hidden_layers(self) -> int:
        return int(self.settings.num_hidden_layers)

    @property
    def num_attention_heads(self) -> int:
        return int(self.settings.num_attention_heads)

    @property
    def num_key_value_heads(self) -> int:
        return int(getattr(self.settings, "num_key_value_heads", None) or self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.settings, "head_dim", None) or self.hidden_size // self.num_attention_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.settings.vocab_size)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.settings, "tie_word_embeddings", False))

    def config(self) -> PretrainedConfig:
        """A fresh config to build from: no KV cache (training), the chosen attention implementation."""
        config = AutoConfig.for_model(**json.loads(self.config_json))
        config.use_cache = False
        config._attn_implementation = self.attn_implementation
        return config

    def describe(self) -> dict[str, Any]:
        """What a record says of the model: preset and source, the dimensions that matter, the config."""
        return {"preset": self.preset, "source": self.source, "model_type": self.model_type,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
                "attn_implementation": self.attn_implementation, "attn_note": self.attn_note,
                "config": json.loads(self.config_json)}


@functools.lru_cache(maxsize=64)
def _reference_config(config_json: str) -> PretrainedConfig:
    return AutoConfig.for_model(**json.loads(config_json))


def preset_names() -> list[str]:
    return sorted(entry.name.removesuffix(".json") for entry in PRESETS_FOLDER.iterdir()
                  if entry.name.endswith(".json"))


def read_preset(name: str) -> tuple[dict[str, Any], str]:
    """(config, source) of a shipped preset; an unknown name lists the allowed ones."""
    entry = PRESETS_FOLDER / f"{name}.json"
    if not isinstance(name, str) or "/" in name or not entry.is_file():
        raise ModelInputError("model.preset", name, "one of " + ", ".join(preset_names()))
    settings = json.loads(entry.read_text(encoding="utf-8"))
    return settings, f"preset {name}: {settings['_source']}"


def read_config_file(path: Path) -> tuple[dict[str, Any], str]:
    """(config, source) of a user's config.json: a readable JSON object naming a model_type."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelInputError("model.config", str(path), "a path to an existing config.json "
                              "(relative to the scenario file)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelInputError("model.config", str(path), f"a readable UTF-8 JSON file ({exc})") from None
    try:
        settings = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelInputError("model.config", str(path), f"a JSON file ({str(exc)[:120]})") from None
    if not isinstance(settings, dict):
        raise ModelInputError("model.config", str(path), "a JSON object (a Hugging Face config.json)")
    return settings, f"config file {path}"


def _check_override(reference: PretrainedConfig, key: str, value: Any) -> None:
    if not hasattr(reference, key):
        raise ModelInputError(f"model.{key}", key, f"a field of the {reference.model_type} config, e.g. "
                              "num_hidden_layers, hidden_size, intermediate_size, num_attention_heads")
    current = getattr(reference, key)
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(current))
    if kinds is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
        raise ModelInputError(f"model.{key}", value, f"a {type(current).__name__} like the config's {current!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 1 and key.endswith(("size", "layers",
                                                                                              "heads", "dim")):
        raise ModelInputError(f"model.{key}", value, "an int >= 1")


def make_model(settings: dict[str, Any], source: str, *, preset: str = "", overrides: dict[str, Any] | None = None,
               attn_implementation: str | None = None) -> HFModel:
    """Validate a config (and a scenario's overrides: a shrunken model of the same family) into an HFModel.

    Special-token ids beyond a shrunken vocabulary are dropped: they name tokens, they do not size anything.
    """
    settings = {k: v for k, v in settings.items() if k not in NOT_CONFIG}
    model_type = settings.get("model_type")
    where = "model.config" if not preset else "model.preset"
    try:
        reference = AutoConfig.for_model(**settings)
    except (ValueError, TypeError, KeyError) as exc:
        allowed = "a config with the model_type of a transformers decoder (llama, qwen2, mistral, ...)"
        raise ModelInputError(f"{where} model_type", model_type, f"{allowed}; transformers says: "
                              f"{str(exc).splitlines()[0][:160]}") from None
    for key, value in (overrides or {}).items():
        _check_override(reference, key, value)
    settings.update(overrides or {})
    vocab = settings.get("vocab_size", reference.vocab_size)
    for key in TOKEN_IDS:
        token = settings.get(key)
        if isinstance(token, int) and token >= vocab:
            settings[key] = None
        elif isinstance(token, list):
            settings[key] = [t for t in token if t < vocab] or None
    attn, note = _attention(type(reference), attn_implementation)
    model = HFModel(json.dumps(settings, sort_keys=True), source, preset, attn, note)
    if type(reference) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING or reference.is_encoder_decoder:
        raise ModelInputError(f"{where} model_type", model_type, "a decoder-only causal LM family "
                              "(one AutoModelForCausalLM builds)")
    return model


def _attention(config_class: type, requested: str | None) -> tuple[str, str]:
    """The attention implementation: the requested one, or sdpa where the family has it, else eager (said why)."""
    if requested is not None and requested not in ATTENTION:
        raise ModelInputError("model.attn_implementation", requested, "one of " + ", ".join(ATTENTION))
    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(config_class, None)
    has_sdpa = bool(getattr(model_class, "_supports_sdpa", False))
    name = getattr(model_class, "__name__", "this family")
    if requested == "sdpa" and not has_sdpa:
        raise ModelInputError("model.attn_implementation", requested,
                              f"eager or flash_attention_2: {name} has no sdpa path in transformers "
                              f"{transformers.__version__}")
    if requested is None and not has_sdpa:
        return "eager", (f"{name} has no sdpa path in transformers {transformers.__version__} "
                         "(Gemma-2 caps attention logits, which sdpa cannot): eager attention chosen")
    return requested or "sdpa", ""
