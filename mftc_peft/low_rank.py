"""The low-rank part of an MFTC adapter (`MFTCConfig.low_rank`, or `low_rank_share`, half the budget by default):
pure helpers for its two factors and its rank, and `LowRankPart`, the layer mixin that holds them.

RoSA (Nikdan et al., 2024) trains a sparse part together with a LoRA-like low-rank part at one total count. With
`low_rank = r > 0` every target weight W (out x in) of the adapter gets `scaling * B @ A` next to its blocks:
A (r x in) starts like PEFT LoRA's A, B (out x r) at zero, both in `nn.Linear` orientation whatever the base layer
stores (transformers' Conv1D keeps W as (in, out); only the dense form for merging is transposed). The layer
(`layer.py`) holds the factors as `mftc_lora_A` / `mftc_lora_B` through the mixin; this module creates and applies
them and splits the budget. Step scales, reselection and spectral coordination act on the blocks only; the part is
never a LoRA to convert to (`supports_lora_conversion` stays False: the blocks are not low-rank).
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Callable, Iterable, Mapping, MutableMapping, Optional

import torch
from torch import nn

from . import defaults
from .config_checks import budget_elements

LOW_RANK_NAMES = ("mftc_lora_A", "mftc_lora_B")  # the layer's containers of the factors
ALPHA_PER_RANK = 2  # alpha = 2r, so scaling = alpha / r = 2: the benchmarks' LoRA


def default_alpha(rank: int) -> float:
    """The scaling numerator `low_rank_alpha=None` stands for."""
    return float(ALPHA_PER_RANK * rank)


def low_rank_scaling(rank: int, alpha: Optional[float]) -> float:
    """alpha / r, as LoRA scales B @ A; `alpha` None means `default_alpha(rank)`."""
    return (default_alpha(rank) if alpha is None else float(alpha)) / rank


def factor_shapes(rank: int, in_features: int, out_features: int) -> dict[str, tuple[int, int]]:
    """The shape of each factor (by its part name) for a weight of `out_features` x `in_features`."""
    return {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}


def blocks_budget(total: int, low_rank_elements: int, *, low_rank: int, budget) -> int:
    """What the budget (`budget` in the config, `total` elements) leaves the blocks after the low-rank part;
    ValueError if the low-rank part alone exceeds it."""
    if low_rank_elements > total:
        raise ValueError(
            f"`low_rank`={low_rank} trains {low_rank_elements:,} elements on the target weights, more than "
            f"`budget`={budget!r} allows ({total:,} elements): the low-rank part is counted inside the budget; "
            "lower `low_rank` or raise `budget`"
        )
    return total - low_rank_elements


def effective_share(share: Optional[float], rank: int) -> float:
    """The share `low_rank_share` stands for: None is the default share, or 0 when `low_rank` fixes the rank."""
    if share is not None:
        return float(share)
    return 0.0 if rank else defaults.LOW_RANK_SHARE


def rank_for_share(share: float, budget, shapes: Iterable[tuple[int, int]], *, stated_rank: int = 0) -> int:
    """The rank `low_rank_share` gives on target weights of these (in_features, out_features): the largest r whose
    r * (in + out) elements per weight fit `share` of the budget; 0 (blocks only, with a warning) if not even one
    does. ValueError if `stated_rank` (the config's `low_rank`, 0 when unset) is another rank."""
    shapes = list(shapes)
    total = budget_elements(budget, sum(i * o for i, o in shapes))
    per_rank = sum(i + o for i, o in shapes)
    rank = math.floor(share * total / per_rank)
    if rank == 0 and not stated_rank:
        warnings.warn(
            f"`low_rank_share`={share!r} of `budget`={budget!r} ({total:,} elements) is less than one rank of the "
            f"low-rank part ({per_rank:,} elements on these target weights): the adapter trains blocks only. Raise "
            "`budget` for a low-rank part, or set low_rank_share=0 to train blocks only without this warning",
            stacklevel=3,
        )
    if stated_rank and stated_rank != rank:
        raise ValueError(
            f"`low_rank`={stated_rank} disagrees with `low_rank_share`={share!r}, which gives rank {rank} on this "
            f"model's target weights with `budget`={budget!r}: was the adapter made for another model or budget? Set "
            "only one of the two"
        )
    return rank


def factor_generator(seed: int, adapter_name: str, module_name: str, rank: int) -> torch.Generator:
    """A generator that differs per module and adapter but not per process (Python's `hash` is salted)."""
    key = f"{seed}|{adapter_name}|{module_name}|low_rank={rank}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key))


def init_factors(
    rank: int, in_features: int, out_features: int, *, generator: torch.Generator, random_b_std: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in fp32 on the CPU. A ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT LoRA's kaiming_uniform_(a=sqrt(5)), drawn
    from `generator` so that the global RNG is left alone. B is zero (the adapter starts as a no-op) unless
    `random_b_std` is given: then N(0, std^2), so that tests can tell an adapter from the base model."""
    bound = 1.0 / math.sqrt(in_features)
    a = (2 * torch.rand(rank, in_features, generator=generator) - 1) * bound  # (r, in)
    if random_b_std is None:
        b = torch.zeros(out_features, rank)  # (out, r)
    else:
        b = random_b_std * torch.randn(out_features, rank, generator=generator)
    return a, b


def low_rank_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * (x @ A.T) @ B.T in the input's dtype: (..., in) -> (..., out); never a dense out x in tensor."""
    return (x @ a.to(x.dtype).T) @ b.to(x.dtype).T * scaling


def low_rank_weight(a: torch.Tensor, b: torch.Tensor, scaling: float, *, fan_in_fan_out: bool) -> torch.Tensor:
    """scaling * B @ A as a dense tensor in the base weight's layout ((in, out) for Conv1D): for merging only."""
    dense = scaling * (b @ a)  # (out, in)
    return dense.T if fan_in_fan_out else dense


def keep_entries(containers: Mapping[str, MutableMapping], adapter_name: str, move: Callable[[], None]) -> None:
    """Run `move` (PEFT's move of a whole adapter to its base layer's device and dtype), then put back the adapter's
    entries of `containers` as the very objects they were: re-creating one part (the blocks or the low-rank factors)
    must neither re-round the other part to a bf16 base's dtype nor replace Parameters an optimiser may hold."""
    kept = {name: container[adapter_name] for name, container in containers.items() if adapter_name in container}
    move()
    for name, value in kept.items():
        containers[name][adapter_name] = value


class LowRankPart:
    """Mixin of `MFTCLayer`: each adapter's optional low-rank factors, kept in `nn.ParameterDict`s that the layer
    lists in `adapter_layer_names`, so that PEFT's saving, trainability and adapter switching cover them.

    The host provides `in_features`, `out_features`, `fan_in_fan_out`, `active_adapters`, `set_adapter`,
    `random_init_std` and `_move_only(adapter_name, names)` (PEFT's device / dtype move for those containers only).
    """

    def _init_low_rank(self) -> None:
        self.mftc_lora_A = nn.ParameterDict({})  # (r, in) per adapter with a low-rank part
        self.mftc_lora_B = nn.ParameterDict({})  # (out, r)
        self.mftc_low_rank_scaling: dict[str, float] = {}  # alpha / r

    def _factors(self) -> dict[str, MutableMapping]:
        return {name: getattr(self, name) for name in LOW_RANK_NAMES}

    def update_low_rank(self, adapter_name: str, rank: int, *, alpha: Optional[float] = None, init_weights: bool = True,
                        seed: int = 0, module_name: str = "") -> None:
        """Create (or replace) the adapter's factors at `rank`, or remove them (rank 0); the blocks stay as they are.
        `init_weights=False` draws B too (for tests); `module_name` gives each weight its own draw."""
        kept_dtype = self.mftc_lora_A[adapter_name].dtype if adapter_name in self.mftc_lora_A else None
        for container in self._factors().values():
            if adapter_name in container:
                del container[adapter_name]
        self.mftc_low_rank_scaling.pop(adapter_name, None)
        if rank == 0:
            return
        a, b = init_factors(rank, self.in_features, self.out_features,
                            generator=factor_generator(seed, adapter_name, module_name, rank),
                            random_b_std=None if init_weights else self.random_init_std)
        self.mftc_lora_A[adapter_name], self.mftc_lora_B[adapter_name] = nn.Parameter(a), nn.Parameter(b)
        self.mftc_low_rank_scaling[adapter_name] = low_rank_scaling(rank, alpha)
        self._move_only(adapter_name, LOW_RANK_NAMES)
        if kept_dtype is not None:  # as the layer's delta: keep the dtype PEFT's upcast (or the user) gave the old ones
            device = self.mftc_lora_A[adapter_name].device
            self.mftc_lora_A[adapter_name] = nn.Parameter(a.to(device=device, dtype=kept_dtype))
            self.mftc_lora_B[adapter_name] = nn.Parameter(b.to(device=device, dtype=kept_dtype))
        self.set_adapter(self.active_adapters)

    def _add_low_rank_updates(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        for adapter_name in self.active_adapters:
            if adapter_name in self.mftc_lora_A:
                a, b = self.mftc_lora_A[adapter_name], self.mftc_lora_B[adapter_name]
                update = low_rank_update(x, a, b, self.mftc_low_rank_scaling[adapter_name])  # (..., out_features)
                result = result + update.to(result.dtype)
        return result

    def _dense_low_rank(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout and the factors' dtype (merging and diagnostics only)."""
        a, b = self.mftc_lora_A[adapter_name], self.mftc_lora_B[adapter_name]
        return low_rank_weight(a, b, self.mftc_low_rank_scaling[adapter_name], fan_in_fan_out=self.fan_in_fan_out)

    def _low_rank_shapes(self, adapter_name: str) -> Optional[dict[str, tuple[int, int]]]:
        """The factor shapes the adapter's config (its rank) gives this weight; None without a low-rank part."""
        if adapter_name not in self.mftc_lora_A:
            return None
        return factor_shapes(self.mftc_lora_A[adapter_name].shape[0], self.in_features, self.out_features)

    def _set_low_rank_requires_grad(self, adapter_name: str, requires_grad: bool) -> None:
        for container in self._factors().values():
            if adapter_name in container:
                container[adapter_name].requires_grad_(requires_grad)
