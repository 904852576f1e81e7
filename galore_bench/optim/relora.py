"""ReLoRA (Lialin et al., 2023) on top of peft LoRA: the LoRA/ReLoRA baselines of GaLore Table 2.

Every ``reset_every`` steps the adapter product is merged into the frozen weight (W += s B A), the
adapter is re-initialised (A kaiming-uniform, B zero, like peft) and its optimizer state is
magnitude-pruned; a jagged cosine LR schedule re-warms after each restart. The sum of many
low-rank updates can be high rank, which is the whole point of restarting.

Defaults (following the ReLoRA code base that the GaLore paper ran its baselines with):
``lora_alpha = 32`` regardless of rank (scale 32/r: 0.25 at r = 128), targets q,k,v,o,gate,up,down,
embeddings / norms / lm_head trained in full (``wrap_lora(train_non_lora=True)``). ReLoRA used
dropout 0.1; we default to 0.0 so the merge is exactly output-preserving in train mode too.
Typical loop (one step counter for restarts and schedule)::

    model = wrap_lora(model, lora_config(128))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = LambdaLR(opt, lambda s: jagged_cosine_lr(s, total, warmup, 1000, 50))
    relora = ReLoRA(model, opt, reset_every=1000)
    for step in range(total):
        relora.maybe_restart(step); loss = model(**batch).loss; loss.backward()
        opt.step(); opt.zero_grad(); sched.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:  # imported where used: peft imports bitsandbytes, which starts CUDA, and the runner's fork
    import peft  # server must not (a process forked after CUDA started cannot use it)
    from peft.tuners.lora.layer import Linear as LoraLinear

from galore_bench.optim.lowrank import DEFAULT_TARGETS

DEFAULT_ALPHA: float = 32.0


def lora_config(
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    use_dora: bool = False,
    init: bool | str = True,
) -> peft.LoraConfig:
    """LoraConfig for the GaLore comparison; ``alpha=None`` means the ReLoRA code base's fixed 32.

    ``use_dora``: DoRA (a trainable magnitude per output row over the normalised W + s B A); ``init``: peft's
    init_lora_weights (True: A kaiming-uniform, B zero, so the wrapped model starts equal to the base; or
    'gaussian', 'pissa', 'olora', ...)."""
    import peft

    return peft.LoraConfig(
        r=rank,
        # peft annotates an int but only ever divides it by r: a float alpha is what scaling needs
        lora_alpha=DEFAULT_ALPHA if alpha is None else alpha,  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        init_lora_weights=init,  # type: ignore[arg-type]  # peft's Literal lists the names; ours are checked
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )


def _lora_layers(model: nn.Module) -> list[LoraLinear]:
    """All peft LoRA Linear layers of the model (the only kind ReLoRA merges)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def wrap_lora(model: nn.Module, config: peft.LoraConfig, train_non_lora: bool = True,
              fp32_adapters: bool = False) -> peft.PeftModel:
    """get_peft_model, then (pre-training setting) unfreeze everything except the wrapped base weights.

    peft freezes all non-adapter params; ReLoRA/GaLore pre-training trains embeddings, norms and lm_head.
    `fp32_adapters`: peft's own default (autocast_adapter_dtype: adapters of a bf16/fp16 model in fp32);
    else the adapters take the model's dtype, as the papers train everything in BF16.
    """
    import peft

    pm = peft.get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)
    if train_non_lora:
        frozen = {id(p) for layer in _lora_layers(pm) for p in layer.get_base_layer().parameters()}
        for p in pm.parameters():
            if id(p) not in frozen:
                p.requires_grad_(True)
    return pm


def magnitude_keep_mask(t: torch.Tensor, prune_ratio: float) -> torch.Tensor:
    """Boolean mask of the largest-|t| (1 - prune_ratio) fraction of entries (all False at 1.0)."""
    mag = t.abs().float()
    k = int(prune_ratio * t.numel())
    if k >= t.numel():
        return torch.zeros_like(mag, dtype=torch.bool)
    if k <= 0:
        return torch.ones_like(mag, dtype=torch.bool)
    return mag > mag.flatten().kthvalue(k).values  # strictly above the k-th smallest magnitude


class ReLoRA:
    """Restart controller around a peft LoRA model and any torch.optim optimizer."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        reset_every: int,
        prune_ratio: float = 0.999,
        adapter_name: str | None = None,
        state_keys: Iterable[str] | None = None,
    ) -> None:
        """``state_keys``: optimizer-state entries to prune (default: every floating tensor shaped like
        its param, e.g. Adam's exp_avg/exp_avg_sq, SGD's momentum_buffer); scalars like 'step' are kept."""
        if reset_every <= 0:
            raise ValueError(f"reset_every must be positive, got {reset_every}")
        if not 0.0 <= prune_ratio <= 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio}")
        self.model, self.optimizer = model, optimizer
        self.reset_every, self.prune_ratio = reset_every, prune_ratio
        self.state_keys = None if state_keys is None else frozenset(state_keys)
        self.layers = _lora_layers(model)
        if not self.layers:
            raise ValueError("model has no peft LoRA Linear layers")
        if adapter_name is None:
            active = getattr(model, "active_adapter", "default")
            adapter_name = active if isinstance(active, str) else active[0]
        self.adapter = adapter_name
        for layer in self.layers:
            if layer.use_dora.get(self.adapter, False) or layer.lora_bias.get(self.adapter, False):
                raise NotImplementedError("ReLoRA merge supports plain LoRA only (no DoRA, no lora_bias)")
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.adapter_parameters() if id(p) not in in_opt]
        if missing:
            raise ValueError(f"{len(missing)} adapter parameters are not in the optimizer")
        self.num_restarts = 0

    def adapter_parameters(self) -> list[torch.Tensor]:
        """The LoRA A and B weights whose optimizer state is reset at each restart."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            A, B, _ = self._weights(layer)
            out += [A, B]
        return out

    def _weights(self, layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This adapter's A and B and the frozen base weight (typed: peft reaches them through nn.Module)."""
        base = cast(nn.Linear, layer.get_base_layer())
        return (cast(nn.Linear, layer.lora_A[self.adapter]).weight, cast(nn.Linear, layer.lora_B[self.adapter]).weight,
                base.weight)

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        """W += scaling * B A (fp32 product), then A kaiming-uniform(a=sqrt 5) and B = 0: output unchanged."""
        for layer in self.layers:
            A, B, base_w = self._weights(layer)
            delta = (B.float() @ A.float()) * layer.scaling[self.adapter]
            if layer.fan_in_fan_out:
                delta = delta.T
            base_w.add_(delta.to(base_w.dtype))
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    @torch.no_grad()
    def reset_optimizer_state(self) -> None:
        """Prune the adapter params' optimizer state in place with ONE mask per param, taken from the
        first state tensor (exp_avg for Adam, momentum_buffer for SGD).

        ReLoRA's code prunes each moment independently; that leaves entries with exp_avg != 0 but
        exp_avg_sq == 0, whose Adam update m / (sqrt(v) + eps) explodes (a loss spike on restart).
        """
        for p in self.adapter_parameters():
            state = self.optimizer.state.get(p)
            if not state:
                continue
            tensors = [
                v
                for k, v in state.items()
                if (self.state_keys is None or k in self.state_keys)
                and torch.is_tensor(v)
                and v.is_floating_point()
                and v.shape == p.shape
            ]
            if not tensors:
                continue
            if self.prune_ratio >= 1.0:
                for v in tensors:
                    v.zero_()
                continue
            keep = magnitude_keep_mask(tensors[0], self.prune_ratio)
            for v in tensors:
                v.mul_(keep.to(v.dtype))

    def maybe_restart(self, step: int) -> bool:
        """Call before step ``step``: restarts (merge, re-init, prune state) at k * reset_every, k >= 1."""
        if step <= 0 or step % self.reset_every != 0:
            return False
        self.merge_and_reinit()
        self.reset_optimizer_state()
        self.num_restarts += 1
        return True


def cosine_after_warmup(step: int, total_steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Cosine decay from 1 to ``min_ratio`` between the end of warm-up and ``total_steps``."""
    progress = min(max((step - warmup) / max(1, total_steps - warmup), 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lr(step: int, total_steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR multiplier of the papers' runs: linear warm-up, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return step / warmup
    return cosine_after_warmup(step, total_steps, warmup, min_ratio)


def jagged_cosine_lr(
    step: int,
    total_steps: int,
    warmup: int,
    restart_every: int,
    restart_warmup: int,
    min_ratio: float = 0.1,
) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, cosine decay to ``min_ratio`` at
    ``total_steps``; at every restart (step % restart_every == 0, after warm-up) the LR drops to 0 and
    re-warms linearly over ``restart_warmup`` steps up to the cosine value where the re-warm-up ends."""
    if warmup >= restart_every or restart_warmup >= restart_every:
        raise ValueError("warmup and restart_warmup must be shorter than restart_every")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup:
        return step / warmup

    def cosine(s: int) -> float:
        return cosine_after_warmup(s, total_steps, warmup, min_ratio)

    since_restart = step % restart_every
    if step >= restart_every and since_restart < restart_warmup:
        return cosine(step - since_restart + restart_warmup) * since_restart / restart_warmup
    return cosine(step)
