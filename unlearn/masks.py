"""Gradient masks of the VarGrad family: the add-on, as one component (docs/methods.md describes the math).

Every masked unlearning method computes, per step, the forget gradient g_U and the retain gradient g_C (one tensor per
parameter), mixes them into d = beta*g_C + (1 - beta)*g_U and hands the result of an add-on d~ to the optimiser.
:class:`GradientMask` owns that add-on and its state (the noise estimates V_U, V_C); no method
re-implements it.

Modes:

============  ====================================================  ===========
mode          d~ (per tensor, element-wise)                          uses pi
============  ====================================================  ===========
none          d                                                      no
and           1[g_U * g_C >= 0] * d                                  no
prob          1[pi >= q] * d                                         yes
focus         pi * d                                                 yes
opt           M(g_U, g_C) * d            (greedy OPT mask)           no
focus_opt     M(pi*g_U, pi*g_C) * pi * d                             yes
saliency      1[|a| >= Q_q(|a|)] * d     (a = saliency gradients)    no
bernoulli     m * d,  m ~ Bernoulli(pi)  (seeded generator)          yes
============  ====================================================  ===========

Everything is computed in the gradients' own dtype and on their device. The multi-tensor ``torch._foreach_*`` kernels
(the ones ``torch.optim.Adam`` uses) keep the per-step cost of the pi modes to a fixed number of kernel launches rather
than a fixed number per parameter tensor (performance budget: NGPlus+prob within 1.3x of NGPlus).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence

import torch

from unlearn.hparams import HParam
from utils import UserError

__all__ = [
    "MASK_MODES",
    "FOCUS_MODES",
    "EMA_VARIANTS",
    "EPS",
    "GradientMask",
    "collect_grads",
    "focus_bounds",
    "quantile_reachable",
    "opt_keep_mask",
    "saliency_keep_mask",
    "addon_hparams",
    "kept_share",
    "KeptFractionMean",
]

MASK_MODES: tuple[str, ...] = ("none", "and", "prob", "focus", "opt", "focus_opt", "saliency", "bernoulli")
#: Modes that need the focus vector pi, hence the noise state V_U, V_C ("uses pi" in the table above).
FOCUS_MODES: tuple[str, ...] = ("prob", "focus", "focus_opt", "bernoulli")
#: ``code``: the authors' swapped-weight update V <- rho*g^2 + (1-rho)*V;
#: ``standard``: the conventional V <- rho*V + (1-rho)*g^2.
EMA_VARIANTS: tuple[str, ...] = ("code", "standard")
#: Added to V inside the square root.
EPS = 1e-8

_OPT_MODES = ("opt", "focus_opt")
#: Modes whose threshold is the quantile q.
QUANTILE_MODES: tuple[str, ...] = ("prob", "saliency")

# The add-on's own hyper-parameters (beta belongs to the bases: every mode, "none" included, mixes with it).
QUANTILE = HParam("quantile", float, 0.5, "mask threshold q (prob) / per-tensor saliency quantile (saliency)",
                  low=0.0, high=1.0, low_open=True, high_open=True)
RHO = HParam("rho", float, 0.9, "weight of the noise-model EMA behind the focus vector", low=0.0, high=1.0,
             low_open=True, high_open=True)
EMA = HParam("ema", str, "code",
             "noise-model update: code = the authors' (swapped weights), standard = conventional EMA",
             choices=EMA_VARIANTS)


def addon_hparams(mode: str | None = None) -> tuple[HParam, ...]:
    """The hyper-parameters add-on `mode` reads (every mode's with None). An unknown mode is a one-line UserError."""
    if mode is None:
        return (QUANTILE, RHO, EMA)
    if mode not in MASK_MODES:
        raise UserError(f"unknown --grad_mask '{mode}'; allowed: {', '.join(MASK_MODES)}")
    return ((QUANTILE,) if mode in QUANTILE_MODES else ()) + ((RHO, EMA) if mode in FOCUS_MODES else ())

_GeneratorSpec = None | int | torch.Generator


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _check_open_unit(name: str, value) -> float:
    if not _is_real(value) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in the open interval (0, 1); got {value!r}")
    return float(value)


def _check_ema(ema) -> str:
    if ema not in EMA_VARIANTS:
        raise ValueError(f"ema must be one of {', '.join(EMA_VARIANTS)}; got {ema!r}")
    return ema


# ---------------------------------------------------------------------------------------------------------------------
# Range of the focus vector


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def focus_bounds(rho: float = 0.9, ema: str = "code") -> tuple[float, float]:
    """Range ``(pi_min, pi_max)`` of the focus vector pi from the second step of a run on (docs/methods.md).

    V includes the current squared gradient, so |s| = |g|/sqrt(V + eps) is bounded by b = 1/sqrt(rho) under
    ``ema="code"`` and by b = 1/sqrt(1 - rho) under ``ema="standard"`` (the latter also bounds the first step).
    Then pi_max = Phi(b)^2 + (1 - Phi(b))^2 and pi_min = 2*Phi(b)*(1 - Phi(b)). For rho = 0.9 and ``"code"`` this is
    (0.2492551, 0.7507449).
    """
    rho = _check_open_unit("rho", rho)
    ema = _check_ema(ema)
    bound = 1.0 / math.sqrt(rho) if ema == "code" else 1.0 / math.sqrt(1.0 - rho)
    p = _normal_cdf(bound)
    return 2.0 * p * (1.0 - p), p * p + (1.0 - p) * (1.0 - p)


def quantile_reachable(quantile: float, rho: float = 0.9, ema: str = "code") -> bool:
    """Whether the PROB threshold ``quantile`` can separate coordinates after the first step (docs/methods.md).

    False when ``quantile > pi_max`` (mode ``prob`` masks every coordinate from the second step on) or
    ``quantile <= pi_min`` (it keeps every coordinate, i.e. degenerates to the base method); see :func:`focus_bounds`.
    """
    quantile = _check_open_unit("quantile", quantile)
    low, high = focus_bounds(rho, ema)
    return low < quantile <= high


def _unreachable_quantile_message(quantile: float, rho: float, ema: str) -> str:
    low, high = focus_bounds(rho, ema)
    effect = (
        "masks every coordinate (the update is zero)"
        if quantile > high
        else "keeps every coordinate (the same as the unmasked base method)"
    )
    return (
        f"GradientMask mode 'prob': quantile {quantile} is outside ({low:.7f}, {high:.7f}], the range of the focus "
        f"vector pi after the first step with ema={ema!r}, rho={rho}; from the second step on the mask {effect} "
        f"(see docs/methods.md, range of the focus vector)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Per-tensor masks


#: Device types on which the OPT cut-off is searched on the host (see `opt_keep_mask`). A CPU has no queue of kernels
#: that a host read would wait for; on accelerators the search stays on the device, with no synchronisation.
HOST_SEARCH_DEVICE_TYPES: tuple[str, ...] = ("cpu",)

# CPU search for the OPT cut-off: first among the k = max(1024, n/16) most conflicting coordinates only, since the
# removed prefix is often short (about 2 % of the coordinates on independent Gaussian gradients); a full sort
# when the cut-off lies further.
_OPT_FIRST_CANDIDATES = 1024
_OPT_CANDIDATE_DIVISOR = 16


def opt_keep_mask(u: torch.Tensor, c: torch.Tensor, beta: float) -> torch.Tensor:
    """Greedy OPT keep-mask M(u, c) of one tensor (docs/methods.md, OPT mask), as a bool tensor of ``u``'s shape.

    With x = u*c, A = (1-beta)/beta, C = beta/(1-beta) and r(S) = min(A*sum_S u^2, C*sum_S c^2) + sum_S x:
    nothing is removed when r(all) >= 0; otherwise the coordinates are removed in ascending order of x (most
    conflicting first) and the shortest such prefix after which r >= 0 is removed (all of them if none qualifies,
    which only rounding can cause). r(S) >= 0 is exactly <d, u> >= 0 and <d, c> >= 0 on the kept set for
    d = beta*c + (1-beta)*u.

    Computed in the inputs' dtype from the totals minus cumulative sums along the ascending order of x. On accelerators
    the whole tensor is sorted (no host synchronisation); on the CPU, where a full sort dominates the cost, the
    feasible case r(all) >= 0 skips the sort and a short prefix is found among the smallest x values only
    (``torch.topk``) before falling back to the full sort. Ties in x may be ordered arbitrarily (as in the authors'
    code).
    """
    if not _is_real(beta) or not 0.0 < float(beta) < 1.0:
        raise ValueError(
            f"OPT mask needs beta in the open interval (0, 1) (it divides by beta and 1 - beta); got {beta!r}"
        )
    if u.shape != c.shape:
        raise ValueError(f"OPT mask needs u and c of the same shape; got {tuple(u.shape)} and {tuple(c.shape)}")
    return _opt_keep_mask(u, c, float(beta), incremental=u.device.type in HOST_SEARCH_DEVICE_TYPES)


def _opt_feasibility(sorted_terms: torch.Tensor, totals: torch.Tensor, beta: float) -> torch.Tensor:
    """r after removing the first j sorted coordinates, for j = 0 .. k (k = number of columns of ``sorted_terms``).

    ``sorted_terms`` has rows x, u^2, c^2 in removal order and ``totals`` their sums over the whole tensor; column j of
    the remaining sums is "totals minus cumulative sums", so column 0 is r(all).
    """
    alpha = 1.0 - beta
    remaining = torch.cat((totals, totals - sorted_terms.cumsum(dim=1)), dim=1)
    return torch.minimum(remaining[1] * (alpha / beta), remaining[2] * (beta / alpha)) + remaining[0]


def _first_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True in a 1-D bool tensor, or its length when there is none (a 0-d tensor, no sync)."""
    first = flags.to(torch.uint8).argmax()  # argmax returns the first maximum; 0 when all are False
    return torch.where(flags[first], first, flags.numel())


def _opt_keep_mask(u: torch.Tensor, c: torch.Tensor, beta: float, incremental: bool) -> torch.Tensor:
    n = u.numel()
    flat_u = u.reshape(-1)
    flat_c = c.reshape(-1)
    # Rows x = u*c, u^2, c^2: one gather and one cumsum serve all three.
    terms = torch.stack((flat_u * flat_c, flat_u.square(), flat_c.square()))
    totals = terms.sum(dim=1, keepdim=True)
    if incremental:
        keep = _opt_keep_short_prefix(terms, totals, beta)
        if keep is not None:
            return keep.view(u.shape)
    order = torch.argsort(terms[0])
    # A cut-off of n + 1 (no column feasible) leaves every arange value below it: everything is removed.
    num_removed = _first_true(_opt_feasibility(terms.index_select(1, order), totals, beta) >= 0)
    keep_sorted = torch.arange(n, device=u.device) >= num_removed
    return torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted).view(u.shape)


def _opt_keep_short_prefix(terms: torch.Tensor, totals: torch.Tensor, beta: float) -> torch.Tensor | None:
    """The OPT keep-mask when nothing or only a short prefix is removed, without a full sort; None otherwise."""
    n = terms.shape[1]
    if bool(_opt_feasibility(terms[:, :0], totals, beta)[0] >= 0):
        return torch.ones(n, dtype=torch.bool, device=terms.device)
    k = max(_OPT_FIRST_CANDIDATES, n // _OPT_CANDIDATE_DIVISOR)
    if k >= n:
        return None
    candidates = torch.topk(terms[0], k, largest=False, sorted=True).indices
    feasible = _opt_feasibility(terms.index_select(1, candidates), totals, beta) >= 0
    if not bool(feasible.any()):
        return None
    keep = torch.ones(n, dtype=torch.bool, device=terms.device)
    keep[candidates[: int(_first_true(feasible))]] = False
    return keep


def _quantile_upper_rank(quantile: float, n: int) -> int:
    """Index ceil(q*(n-1)) into the ascending sorted values; q*(n-1) in double, as torch.quantile on float64."""
    return min(int(math.ceil(quantile * (n - 1))), n - 1)


def saliency_keep_mask(scores: torch.Tensor, quantile: float) -> torch.Tensor:
    """Keep-mask {|a| >= Q_q(|a|)} of one tensor (mode ``saliency``), as a bool tensor.

    With sorted magnitudes v_0 <= ... <= v_{n-1}, both the linear and the midpoint ``torch.quantile`` thresholds lie in
    [v_floor(q(n-1)), v_ceil(q(n-1))] and equal the lower value only when q(n-1) is an integer, so the kept set is
    {|a| >= v_ceil(q(n-1))}: ties at the threshold are kept. A k-th value selection finds that threshold without
    torch.quantile's limit of 2^24 elements (and without a full sort).

    The position q(n-1) is taken in double precision, which is what torch.quantile does for float64 input (identical
    masks for both interpolations). On float32 input torch.quantile rounds q to float32 first; when q(n-1) is an integer
    and float32(q) > q, its midpoint threshold then moves one value up while its linear one usually does not, so the
    two torch masks can differ from each other there; this function follows the exact position q(n-1).
    """
    magnitude = scores.detach().abs()
    n = magnitude.numel()
    if n == 0:
        return torch.ones_like(magnitude, dtype=torch.bool)
    rank = _quantile_upper_rank(float(quantile), n)
    threshold = torch.kthvalue(magnitude.reshape(-1), rank + 1).values  # kthvalue is 1-based
    return magnitude >= threshold


def _nonnegative_indicator_(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """In place, x -> 1[x >= 0] (1.0 / 0.0) for a list of tensors, with three multi-tensor kernels.

    sign(x) + 1 is 0 for x < 0 and 1 or 2 for x >= 0 (also for -0.0); clamping at 1 gives the indicator. For
    x = pi - q this is exactly 1[pi >= q]: a float difference is zero only for equal operands and keeps the sign.
    """
    torch._foreach_sign_(values)
    torch._foreach_add_(values, 1.0)
    torch._foreach_clamp_max_(values, 1.0)
    return values


# ---------------------------------------------------------------------------------------------------------------------
# Gradient collection


def collect_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of every parameter's ``.grad``, zeros for a parameter whose ``.grad`` is None.

    The unlearning loop must clone g_U (and the saliency gradients) before the retain backward: ``zero_grad`` with
    ``set_to_none=False`` zeroes the very tensors a plain reference would point to, and the next backward accumulates
    into them. Zeros keep one entry per parameter so the lists line up with ``model.parameters()``.
    """
    return [
        torch.zeros_like(p, requires_grad=False) if p.grad is None else p.grad.detach().clone()
        for p in params
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Kept fraction


def kept_share(kept: int, total: int) -> float:
    """Fraction of `total` coordinates that `kept` are; 1.0 when there are none (nothing was masked)."""
    return kept / total if total else 1.0


class KeptFractionMean:
    """Mean over the steps of an epoch of :attr:`GradientMask.kept_fraction`, with one host read per epoch.

    :meth:`add` records the mask's device-side count after each step (no synchronisation); :meth:`value` brings every
    count to the host in one transfer and averages the per-step fractions in step order, so the result is the same
    float as reading ``kept_fraction`` after every step and averaging (1.0 when no step was added).
    """

    def __init__(self) -> None:
        self._steps: list[tuple[int | torch.Tensor, int]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, mask: GradientMask) -> None:
        count = mask.kept_count
        if count is None:
            raise ValueError("KeptFractionMean.add needs a mask that has computed a direction")
        self._steps.append((count, mask.num_elements))

    def value(self) -> float:
        if not self._steps:
            return 1.0
        on_device = [count for count, _ in self._steps if isinstance(count, torch.Tensor)]
        host = iter(torch.stack(on_device).tolist()) if on_device else iter(())
        total = 0.0
        for count, elements in self._steps:
            total += kept_share(next(host) if isinstance(count, torch.Tensor) else count, elements)
        return total / len(self._steps)


# ---------------------------------------------------------------------------------------------------------------------
# The add-on


class GradientMask:
    """The add-on of the VarGrad family: one object per unlearning run.

    Args:
        mode: one of :data:`MASK_MODES`.
        beta: weight of the retain gradient in d = beta*g_C + (1-beta)*g_U, in [0, 1]; ``opt``/``focus_opt`` need the
            open interval (0, 1).
        quantile: threshold q of ``prob`` (keep pi >= q) and quantile of ``saliency``; in (0, 1). Ignored otherwise.
        rho: weight of the noise EMA, in (0, 1); 0.9 in the authors' code.
        ema: ``"code"`` (the authors' update, default) or ``"standard"`` (conventional EMA, a documented deviation).
        generator: randomness of mode ``bernoulli`` (ignored by the other modes).
            ``None``: seed taken from ``torch.initial_seed()`` when the mask is built (so a run seeded with
            ``torch.manual_seed`` is reproducible); an ``int``: that seed. With a seed the mask owns one
            ``torch.Generator`` per device, seeded with it, and :meth:`reset` re-seeds them (each run draws the same
            masks for the same gradients). A ``torch.Generator``: used as given (it must be on the gradients' device)
            and left alone by :meth:`reset`, since its owner controls it.

    A warning is emitted once, at construction, when ``mode="prob"`` and q cannot separate coordinates after the first
    step (:func:`quantile_reachable`; for ``ema="code"``, rho = 0.9: q outside (0.2492551, 0.7507449]).

    Inputs are never modified; the returned tensors are new. The state V_U, V_C has the parameters' shapes, persists
    across the calls (and epochs) of a run and is cleared only by :meth:`reset`.
    """

    def __init__(
        self,
        mode: str,
        beta: float = 0.9,
        quantile: float = QUANTILE.default,
        rho: float = RHO.default,
        ema: str = EMA.default,
        generator: _GeneratorSpec = None,
    ) -> None:
        if mode not in MASK_MODES:
            raise ValueError(f"unknown gradient mask mode {mode!r}; allowed: {', '.join(MASK_MODES)}")
        if not _is_real(beta) or not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1]; got {beta!r}")
        if mode in _OPT_MODES and not 0.0 < float(beta) < 1.0:
            raise ValueError(
                f"mode {mode!r} needs beta in the open interval (0, 1) (OPT divides by beta and 1 - beta); got {beta!r}"
            )
        self.mode: str = mode
        self.beta: float = float(beta)
        self.quantile: float = _check_open_unit("quantile", quantile)
        self.rho: float = _check_open_unit("rho", rho)
        self.ema: str = _check_ema(ema)

        self._own_generator: torch.Generator | None = None
        self._seed: int | None = None
        if isinstance(generator, torch.Generator):
            self._own_generator = generator
        elif generator is None:
            self._seed = int(torch.initial_seed())
        elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
            self._seed = int(generator)
        else:
            raise ValueError(
                f"generator must be None, an int seed or a torch.Generator; got {type(generator).__name__}"
            )

        self.reset()
        if mode == "prob" and not quantile_reachable(self.quantile, self.rho, self.ema):
            warnings.warn(_unreachable_quantile_message(self.quantile, self.rho, self.ema), UserWarning, stacklevel=2)

    # -- state ------------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new run: clear V_U, V_C, the last focus vector and kept fraction; re-seed seeded generators."""
        self._v_forget: list[torch.Tensor] | None = None
        self._v_retain: list[torch.Tensor] | None = None
        self._last_focus: list[torch.Tensor] | None = None
        self._kept_masks: list[torch.Tensor] | None = None
        self._kept_count: None | int | torch.Tensor = None
        self._kept_fraction: float | None = None
        self._num_elements = 0
        self._generators = {}

    @property
    def uses_focus(self) -> bool:
        """Whether this mode needs the focus vector pi (and so carries the noise state)."""
        return self.mode in FOCUS_MODES

    @property
    def uses_saliency(self) -> bool:
        """Whether ``direction`` reads ``saliency_grads`` (mode ``saliency``)."""
        return self.mode == "saliency"

    @property
    def noise_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The live buffers ``(V_U, V_C)``, one tensor per parameter, or None before the first step (read only)."""
        if self._v_forget is None:
            return None
        return self._v_forget, self._v_retain

    @property
    def last_focus(self) -> list[torch.Tensor] | None:
        """pi per tensor from the last call; None in modes without pi and before the first call."""
        return self._last_focus

    @property
    def kept_fraction(self) -> float | None:
        """Fraction of coordinates kept by the last call, over all tensors weighted by size (None before a call).

        1.0 for ``none`` and ``focus``; the kept share of M for ``opt``/``focus_opt``; the drawn share for
        ``bernoulli``; the kept share for ``and``/``prob``/``saliency``. Computed on first access, so steps whose
        fraction is never read pay no device-to-host synchronisation. A loop that wants the fraction of every step
        without a synchronisation per step reads :attr:`kept_count` instead (see :class:`KeptFractionMean`).
        """
        if self._kept_fraction is None:
            count = self.kept_count
            if count is not None:
                self._kept_fraction = kept_share(int(count), self._num_elements)
        return self._kept_fraction

    @property
    def kept_count(self) -> None | int | torch.Tensor:
        """Number of coordinates kept by the last call, without a host synchronisation (None before a call).

        A 0-d int64 tensor on the gradients' device for the modes that mask, counted on the device; a Python int for
        ``none`` and ``focus`` (every coordinate). The fraction is ``kept_share(count, num_elements)``.
        """
        if self._kept_count is None and self._kept_masks is not None:
            self._kept_count = torch.stack([torch.count_nonzero(mask) for mask in self._kept_masks]).sum()
            self._kept_masks = None
        return self._kept_count

    @property
    def num_elements(self) -> int:
        """Number of coordinates of the last call (all tensors together)."""
        return self._num_elements

    def __repr__(self) -> str:
        return (
            f"GradientMask(mode={self.mode!r}, beta={self.beta}, quantile={self.quantile}, rho={self.rho}, "
            f"ema={self.ema!r})"
        )

    # -- the step ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def direction(
        self,
        forget_grads: Sequence[torch.Tensor],
        retain_grads: Sequence[torch.Tensor],
        saliency_grads: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Update directions d~ for one step (what goes into ``.grad`` before the optimiser step).

        Args:
            forget_grads: g_U, one tensor per parameter (already cloned by the caller, see :func:`collect_grads`).
            retain_grads: g_C, same shapes.
            saliency_grads: gradients whose magnitudes rank coordinates in mode ``saliency`` (defaults to
                ``forget_grads``); ignored by the other modes.

        Returns:
            New tensors d~ = add-on(beta*g_C + (1-beta)*g_U), one per parameter. In the pi modes the noise state is
            updated with this step's gradients first.
        """
        g_u = list(forget_grads)
        g_c = list(retain_grads)
        self._check_gradients(g_u, g_c, "retain_grads")
        scores: list[torch.Tensor] | None = None
        if self.mode == "saliency":
            scores = g_u if saliency_grads is None else list(saliency_grads)
            self._check_gradients(g_u, scores, "saliency_grads")

        self._num_elements = sum(g.numel() for g in g_u)
        self._kept_fraction = None
        self._kept_count = None
        self._kept_masks = None
        if not g_u:
            self._last_focus = [] if self.uses_focus else None
            self._kept_count = 0
            self._kept_fraction = 1.0
            return []

        # Two products then a sum (not a fused multiply-add) so that d is bitwise beta*g_C + (1-beta)*g_U as
        # written anywhere else, on every device.
        d = list(torch._foreach_mul(g_c, self.beta))
        torch._foreach_add_(d, torch._foreach_mul(g_u, 1.0 - self.beta))

        focus = self._focus_vector(g_u, g_c) if self.uses_focus else None
        self._last_focus = focus
        mode = self.mode
        if mode == "none" or mode == "focus":
            if focus is not None:
                torch._foreach_mul_(d, focus)
            self._kept_count = self._num_elements
            self._kept_fraction = 1.0
        elif mode == "and":
            # sign(g_U)*g_C has the sign of g_U*g_C without the underflow of a product of two small numbers.
            agree = torch._foreach_sign(g_u)
            torch._foreach_mul_(agree, g_c)
            self._keep(d, _nonnegative_indicator_(agree))
        elif mode == "prob":
            self._keep(d, _nonnegative_indicator_(torch._foreach_sub(focus, self.quantile)))
        elif mode == "opt":
            self._keep(d, [opt_keep_mask(u, c, self.beta) for u, c in zip(g_u, g_c)])
        elif mode == "focus_opt":
            weighted_u = torch._foreach_mul(g_u, focus)
            weighted_c = torch._foreach_mul(g_c, focus)
            masks = [opt_keep_mask(u, c, self.beta) for u, c in zip(weighted_u, weighted_c)]
            del weighted_u, weighted_c
            torch._foreach_mul_(d, focus)
            self._keep(d, masks)
        elif mode == "saliency":
            self._keep(d, [saliency_keep_mask(a, self.quantile) for a in scores])
        elif mode == "bernoulli":
            self._keep(d, [self._draw(p) for p in focus])
        return d

    # -- internals --------------------------------------------------------------------------------------------------

    def _keep(self, d: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        """d <- mask * d in place; remember the masks for :attr:`kept_fraction`."""
        if all(m.dtype == dd.dtype for m, dd in zip(masks, d)):
            torch._foreach_mul_(d, masks)
        else:
            for dd, m in zip(d, masks):
                dd.mul_(m)
        self._kept_masks = masks

    def _check_gradients(self, first: list[torch.Tensor], other: list[torch.Tensor], other_name: str) -> None:
        if len(first) != len(other):
            raise ValueError(
                f"forget_grads and {other_name} must have one tensor per parameter; got {len(first)} and {len(other)}"
            )
        for index, (a, b) in enumerate(zip(first, other)):
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                raise ValueError(
                    f"gradient {index} is not a tensor (use collect_grads to turn missing gradients into zeros)"
                )
            if a.shape != b.shape:
                raise ValueError(
                    f"gradient {index}: forget_grads has shape {tuple(a.shape)} but {other_name} has {tuple(b.shape)}; "
                    f"shapes must match per parameter"
                )

    def _update_noise(self, state: list[torch.Tensor] | None, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """One EMA step of V = E[g^2], in place on the mask's own buffers after the first step."""
        if state is None:
            state = list(torch._foreach_mul(grads, grads))
            torch._foreach_mul_(state, 1.0 - self.rho)
            return state
        if len(state) != len(grads) or any(v.shape != g.shape for v, g in zip(state, grads)):
            raise ValueError(
                "gradients do not match the shapes of the mask's noise state; call reset() before a new run"
            )
        if self.ema == "code":
            torch._foreach_mul_(state, 1.0 - self.rho)
            torch._foreach_addcmul_(state, grads, grads, value=self.rho)
        else:
            torch._foreach_mul_(state, self.rho)
            torch._foreach_addcmul_(state, grads, grads, value=1.0 - self.rho)
        return state

    @staticmethod
    def _centred_cdf(grads: list[torch.Tensor], state: list[torch.Tensor]) -> list[torch.Tensor]:
        """erf(s/sqrt(2)) = 2*Phi(s) - 1 with s = g / sqrt(V + eps), computed as erf(g / sqrt(2V + 2eps))."""
        scaled = torch._foreach_mul(state, 2.0)
        torch._foreach_add_(scaled, 2.0 * EPS)
        torch._foreach_sqrt_(scaled)
        scaled = list(torch._foreach_div(grads, scaled))
        torch._foreach_erf_(scaled)
        return scaled

    def _focus_vector(self, g_u: list[torch.Tensor], g_c: list[torch.Tensor]) -> list[torch.Tensor]:
        """Update V_U, V_C with this step's gradients, then pi = p_U*p_C + (1-p_U)*(1-p_C) per tensor.

        With p = (1 + e)/2, e = erf(s/sqrt(2)), the same pi is 1/2 + e_U*e_C/2
        (pi - 1/2 = 2(p_U - 1/2)(p_C - 1/2)).
        That form costs fewer kernels and gives pi = 1/2 exactly when either gradient coordinate is 0, so 1[pi >= 1/2]
        is the sign test.
        """
        self._v_forget = self._update_noise(self._v_forget, g_u)
        self._v_retain = self._update_noise(self._v_retain, g_c)
        focus = self._centred_cdf(g_u, self._v_forget)
        torch._foreach_mul_(focus, self._centred_cdf(g_c, self._v_retain))
        torch._foreach_mul_(focus, 0.5)
        torch._foreach_add_(focus, 0.5)
        return focus

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._own_generator is not None:
            if self._own_generator.device.type != device.type:
                raise ValueError(
                    f"the bernoulli generator is on {self._own_generator.device} but the gradients are on {device}; "
                    f"pass a generator on the gradients' device or an int seed"
                )
            return self._own_generator
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator

    def _draw(self, focus: torch.Tensor) -> torch.Tensor:
        """m ~ Bernoulli(pi), i.i.d. per coordinate, as 1[U < pi] with U uniform on [0, 1) (mode bernoulli)."""
        uniform = torch.rand(
            focus.shape, generator=self._generator_for(focus.device), device=focus.device, dtype=focus.dtype
        )
        return uniform < focus
