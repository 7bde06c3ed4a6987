"""Combine several adapters into one: PEFT's `add_weighted_adapter`, as pure functions over
parsed adapter weights (`AdapterWeights`), used by the Adapters API and per-request mixtures.

    spec = CombineSpec(method="ties", weights=(1.0, 0.5), density=0.5)
    combined = combine_adapters([a, b], spec, max_rank=64)   # -> AdapterWeights

Semantics follow peft 0.21.2 (`LoraModel.add_weighted_adapter` and `utils/merge_utils.py`), per
adapted module, with s_i the module's scale in adapter i and w_i its weight:

  cat          A = concat_i(w_i * s_i * A_i) (rows), B = concat_i(B_i) (columns); rank = sum of ranks.
               Exact: delta = sum_i w_i * s_i * B_i @ A_i.
  linear, ties, dare_linear, dare_ties, magnitude_prune
               combine the A factors with weights sign(w_i s_i) * sqrt|w_i s_i| and the B factors
               with sqrt|w_i s_i| (the sign on one side only), each side through merge_utils'
               task_arithmetic / ties / dare_* / magnitude_prune. Every adapter must have the same
               rank on a module (PEFT: "same r").
  svd and the *_svd variants
               delta_i = s_i * B_i @ A_i, combined in delta space (task_arithmetic for svd, ties
               for ties_svd, ...), then truncated: U, S, Vh = svd(delta); B = U[:, :k] * S[:k],
               A = Vh[:k] (k = svd_rank, default the largest rank), optionally clamped to the
               svd_clamp quantile of their entries.
The new adapter's scale is 1 (PEFT sets r = lora_alpha = the new rank). With one adapter PEFT
turns every method into `linear`; so does this.

Where loraplex is stricter than PEFT (it names the field instead of computing something odd):
- linear / ties / dare_* / magnitude_prune need every adapter to target the same modules: they
  average the A and B factors separately, which PEFT does over whichever adapters have the module,
  so a module of one adapter alone would keep sqrt-weighted factors, not w*s. cat and the svd
  methods accept different targets (an absent adapter's delta is zero there).
- ties / dare_ties / ties_svd / dare_ties_svd refuse negative weights: the majority sign is
  elected on the UNWEIGHTED tensors, so a negative weight would merge the entries of the sign it
  did not vote for.
- svd_rank may not exceed the sum of the adapters' ranks (the delta has no more directions).
- PEFT copies use_rslora from the first adapter's config into the new one, which rescales its
  result by sqrt(new rank) when that adapter used rsLoRA; the combined delta here is the one the
  formulas above define (scale 1) whatever the inputs' configs were.

Randomness: DARE drops entries with torch.bernoulli. PEFT draws from torch's global generator;
here a torch.Generator seeded with `seed` is used, in PEFT's order (modules in model order, A side
then B side, adapters in order), so `torch.manual_seed(seed)` before PEFT's call gives the same
masks and a seeded combination is reproducible without touching the process-wide generator.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import AdapterCombineError
from .peft_format import AdapterWeights, LoraModule
from .target_match import module_order, projection_key

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat",) + FACTOR_METHODS + SVD_METHODS
_DENSITY_METHODS = frozenset(METHODS) - {"cat", "linear", "svd"}
_SIGN_METHODS = frozenset({"ties", "dare_ties", "ties_svd", "dare_ties_svd"})
_RANDOM_METHODS = frozenset({"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"})
MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class CombineSpec:
    """How to combine; validated here so a bad request fails before any tensor work."""

    method: str
    weights: tuple[float, ...]
    density: float | None = None  # fraction of entries kept, (0, 1]; the pruning methods need it
    svd_rank: int | None = None  # None = the largest rank of the inputs
    svd_clamp: float | None = None  # quantile in [0, 1] of the SVD factors' entries, None = no clamp
    majority_sign_method: str = "total"
    seed: int | None = None  # DARE's random drop; None = a fresh random seed

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AdapterCombineError("method", f"must be one of {', '.join(METHODS)}; got {self.method!r}")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.weights:
            raise AdapterCombineError("adapters", "name at least one adapter")
        for i, w in enumerate(self.weights):
            if not math.isfinite(w):
                raise AdapterCombineError(f"adapters[{i}].weight", f"must be a finite number, got {w}")
            if w < 0 and self.method in _SIGN_METHODS and len(self.weights) > 1:
                raise AdapterCombineError(
                    f"adapters[{i}].weight", f"must be >= 0 for {self.method} (its sign election runs on the "
                    f"unweighted tensors), got {w}")
        if self.method in _DENSITY_METHODS and len(self.weights) > 1:
            d = self.density
            if d is None or not math.isfinite(d) or not 0.0 < d <= 1.0:
                raise AdapterCombineError("density", f"{self.method} needs a density in (0, 1], got {d}")
        if self.svd_rank is not None and (isinstance(self.svd_rank, bool) or self.svd_rank < 1):
            raise AdapterCombineError("svd_rank", f"must be >= 1 (or unset), got {self.svd_rank}")
        c = self.svd_clamp
        if c is not None and (not math.isfinite(c) or not 0.0 <= c <= 1.0):
            raise AdapterCombineError("svd_clamp", f"must be a quantile in [0, 1], got {c}")
        if self.seed is not None and (isinstance(self.seed, bool) or not 0 <= self.seed < 2**64):
            raise AdapterCombineError("seed", f"must be an integer in [0, 2**64), got {self.seed}")
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise AdapterCombineError("majority_sign_method", f"must be 'total' or 'frequency', got "
                                                              f"{self.majority_sign_method!r}")

    @property
    def effective_method(self) -> str:
        return "linear" if len(self.weights) == 1 else self.method  # as PEFT does


# --------------------------------------------------------------------------------------------
# merge_utils, re-implemented (same torch calls in the same order: same results, same RNG draws)
# --------------------------------------------------------------------------------------------

def _prune(t: torch.Tensor, density: float, random: bool, gen: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return t
    if random:  # DARE: keep each entry with probability `density`, rescale by 1/density
        mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
        return t * mask / density
    keep = int(density * t.numel())  # magnitude: the top `keep` entries by |value|
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=keep, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _merge(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, spec: CombineSpec,
           gen: torch.Generator | None) -> torch.Tensor:
    """One merge_utils combination of same-shape `tensors` with `weights` [n] (float32)."""
    base = method.removesuffix("_svd")
    if base in ("linear", "svd"):
        pruned = tensors
    else:
        pruned = [_prune(t, spec.density, base.startswith("dare"), gen) for t in tensors]
    stacked = torch.stack(pruned, dim=0)  # [n, ...]
    w = weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if base.endswith("ties"):
        sign = stacked.sign()
        votes = stacked.sum(dim=0) if spec.majority_sign_method == "total" else sign.sum(dim=0)
        agree = sign == torch.where(votes >= 0, 1, -1)  # [n, ...] entries of the elected sign
        kept = (stacked * w * agree).sum(dim=0)
        return kept / torch.clamp(agree.sum(dim=0), min=1.0)
    return (stacked * w).sum(dim=0)


# --------------------------------------------------------------------------------------------
# Per module
# --------------------------------------------------------------------------------------------

def _cat(mods: list[tuple[float, LoraModule]]) -> LoraModule:
    a = torch.cat([m.A * w * m.scale for w, m in mods], dim=0).contiguous()  # [sum r, in]
    b = torch.cat([m.B for _, m in mods], dim=1).contiguous()  # [out, sum r]
    return LoraModule(A=a, B=b, scale=1.0, rank=a.shape[0])


def _factors(mods: list[tuple[float, LoraModule]], spec: CombineSpec, gen) -> LoraModule:
    wa, wb = [], []
    for w, m in mods:
        ws = w * m.scale
        root = math.sqrt(abs(ws))
        wa.append(root if ws >= 0 else -root)  # the sign on one side only
        wb.append(root)
    method = spec.effective_method
    a = _merge(method, [m.A for _, m in mods], torch.tensor(wa), spec, gen)  # [r, in]
    b = _merge(method, [m.B for _, m in mods], torch.tensor(wb), spec, gen)  # [out, r]
    return LoraModule(A=a.contiguous(), B=b.contiguous(), scale=1.0, rank=a.shape[0])


def _svd(mods: list[tuple[float, LoraModule]], spec: CombineSpec, rank: int, gen) -> LoraModule:
    deltas = [(m.B @ m.A) * m.scale for _, m in mods]  # [out, in] each, as PEFT's get_delta_weight
    delta = _merge(spec.method, deltas, torch.tensor([w for w, _ in mods]), spec, gen)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :rank] @ torch.diag(s[:rank])  # [out, k]
    vh = vh[:rank, :]  # [k, in]
    if spec.svd_clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), spec.svd_clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return LoraModule(A=vh.contiguous(), B=u.contiguous(), scale=1.0, rank=vh.shape[0])


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def _float32(m: LoraModule) -> LoraModule:
    if m.A.dtype == torch.float32:
        return m
    return LoraModule(A=m.A.float().contiguous(), B=m.B.float().contiguous(), scale=m.scale, rank=m.rank)


def combine_adapters(adapters: Sequence[AdapterWeights], spec: CombineSpec, max_rank: int,
                     label: str = "combined") -> AdapterWeights:
    """The combined adapter (float32 tensors, in memory). Raises AdapterCombineError naming the
    request field ("adapters", "svd_rank", ...) when the inputs do not fit the method."""
    if len(adapters) != len(spec.weights):
        raise AdapterCombineError("adapters", f"{len(adapters)} adapters but {len(spec.weights)} weights")
    method = spec.effective_method
    # model order: PEFT's DARE draw order
    keys = sorted({k for a in adapters for k in a.modules}, key=module_order)
    if method in FACTOR_METHODS:
        for i, a in enumerate(adapters[1:], start=1):
            if set(a.modules) != set(adapters[0].modules):
                only = sorted(set(a.modules) ^ set(adapters[0].modules), key=module_order)[:3]
                raise AdapterCombineError(
                    "adapters", f"{method} needs adapters with the same target modules; adapters[{i}] and "
                    f"adapters[0] differ on {[projection_key(*k) for k in only]} (use cat or svd)")
    sum_rank = 0  # the largest sum of ranks over modules: cat's rank, svd's upper bound
    for key in keys:
        present = [(i, a.modules[key]) for i, a in enumerate(adapters) if key in a.modules]
        dims = {(m.A.shape[1], m.B.shape[0]) for _, m in present}
        if len(dims) > 1:
            raise AdapterCombineError(
                "adapters", f"the adapters were made for different base models: {projection_key(*key)} has "
                f"(in, out) features {sorted(dims)} across adapters {[i for i, _ in present]}")
        ranks = [m.rank for _, m in present]
        if method in FACTOR_METHODS and len(set(ranks)) > 1:
            raise AdapterCombineError(
                "adapters", f"{method} needs one rank per module; {projection_key(*key)} has ranks {ranks} "
                "(use cat or svd)")
        sum_rank = max(sum_rank, sum(ranks))
    largest = max(a.max_rank for a in adapters)
    rank = spec.svd_rank or largest
    if method in SVD_METHODS:
        if rank > sum_rank:
            raise AdapterCombineError(
                "svd_rank", f"{rank} is above the sum of the adapters' ranks ({sum_rank}): the combined update "
                "has no more directions than that")
        first = {k: next(a.modules[k] for a in adapters if k in a.modules) for k in keys}
        narrow = next((k for k in keys if rank > min(first[k].A.shape[1], first[k].B.shape[0])), None)
        if narrow is not None:
            raise AdapterCombineError("svd_rank", f"{rank} is above the smaller dimension of {projection_key(*narrow)}")
    out_rank = {"cat": sum_rank}.get(method, rank if method in SVD_METHODS else largest)
    if out_rank > max_rank:
        field = "svd_rank" if method in SVD_METHODS else "adapters"
        raise AdapterCombineError(field, f"the combined adapter would have rank {out_rank}, above the "
                                         f"server's max LoRA rank {max_rank} (--max-lora-rank)")
    gen = None
    if method in _RANDOM_METHODS:
        seed = spec.seed if spec.seed is not None else int(torch.seed())
        gen = torch.Generator().manual_seed(seed)
    modules: dict[tuple[int, str], LoraModule] = {}
    with torch.no_grad():
        for key in keys:
            mods = [(w, _float32(a.modules[key])) for w, a in zip(spec.weights, adapters) if key in a.modules]
            if method == "cat":
                modules[key] = _cat(mods)
            elif method in FACTOR_METHODS:
                modules[key] = _factors(mods, spec, gen)
            else:
                modules[key] = _svd(mods, spec, rank, gen)
    return in_memory_adapter(modules, label)


def in_memory_adapter(modules: dict[tuple[int, str], LoraModule], label: str) -> AdapterWeights:
    """AdapterWeights for weights built in memory; the fingerprint hashes the tensors themselves."""
    for key, m in modules.items():
        if not (bool(torch.isfinite(m.A).all()) and bool(torch.isfinite(m.B).all())):
            raise AdapterCombineError("adapters", f"the combination overflows on {projection_key(*key)}")
    digest = hashlib.sha256()
    for key in sorted(modules, key=module_order):
        m = modules[key]
        digest.update(f"{projection_key(*key)}:{m.rank}:{m.scale!r}".encode())
        digest.update(m.A.contiguous().numpy().tobytes())
        digest.update(m.B.contiguous().numpy().tobytes())
    return AdapterWeights(modules=modules, peft_type="LORA", source_path=label, weights_file="",
                          file_bytes=0, config_sha256="", fingerprint=digest.hexdigest())
