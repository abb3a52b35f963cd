"""Connection budgets and the Bayesian connectivity sampler (Langevin noise + rewiring).

The sampler runs *after* the optimizer step, inside the compiled training step:

1. dormant entries need no work: their gradient through max(0, θ) is zero, their optimizer slots are zero
   and θ = 0 is a fixed point of the update and of weight decay, so they stay exactly 0;
2. Langevin noise sqrt(2·η_t·T)·N(0, 1) is added to the entries that were active (BCS only);
3. entries that crossed to θ ≤ 0 die: θ = 0 and every optimizer slot of the entry is reset to 0;
4. rewiring: per budget group, ``budget − active`` dormant entries, chosen uniformly without replacement
   among all dormant entries of the group, are re-activated with θ = 1e-12 (signs kept, slots already 0).

So after every step the number of active entries equals the budget exactly. With ``rewire=False`` (the
random-static baseline) the mask never changes: an active entry whose θ crosses zero flips its sign γ
together with θ and its slots instead of dying, which is exactly SGD on an unconstrained masked weight.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from bcs_tf._keras_compat import optimizer_trainable_variables, optimizer_variable_index
from bcs_tf.errors import ConfigError, check_fraction
from bcs_tf.layers import sparse_layers

BUDGET_MODES = ("global", "layer")
REGROW_VALUE = 1e-12


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Initial active count per layer and the budget groups whose counts the sampler keeps fixed."""

    counts: tuple
    groups: tuple  # tuple of tuples of layer indices
    budgets: tuple  # one budget per group

    def to_dict(self):
        """JSON-friendly form."""
        return {"counts": list(self.counts), "groups": [list(g) for g in self.groups], "budgets": list(self.budgets)}

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict` (as ``metrics.json["allocation"]`` records it)."""
        return cls(tuple(data["counts"]), tuple(tuple(g) for g in data["groups"]), tuple(data["budgets"]))

    def problem(self, counts, names=None):
        """None when the per-layer active ``counts`` fill every budget group exactly, else what is wrong (the one
        budget check: before every save, for static masks, and for an exported network)."""
        names = names or [f"layer {i}" for i in range(len(counts))]
        if len(counts) != len(self.counts):
            return f"{len(counts)} sparse layers where the allocation has {len(self.counts)}"
        for group, budget in zip(self.groups, self.budgets):
            active = sum(counts[i] for i in group)
            if active != budget:
                return f"{active} active connections in {', '.join(names[i] for i in group)}, the budget is {budget}"
        return None


def _counts_for_total(sizes, fractions, total):
    """Integer counts near fractions·sizes, each in [1, size], summing exactly to ``total``.

    Below the budget, the deficit is spread in proportion to full layer size (what the authors' first
    rewiring step does in expectation); above it, all counts shrink by one common factor.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    raw = np.minimum(np.asarray(fractions, dtype=np.float64) * sizes, sizes)
    if total > sizes.sum():
        raise ConfigError(f"budget {total} exceeds the {sizes.sum()} prunable entries")
    if raw.sum() <= total:
        curve = lambda s: np.minimum(sizes, raw + s * sizes)  # noqa: E731
    else:
        curve = lambda s: s * raw  # noqa: E731
    lo, hi = 0.0, 1.0
    for _ in range(200):  # bisection on the monotone curve (caps make it piecewise linear)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if curve(mid).sum() < total else (lo, mid)
    target = curve(hi)
    counts = np.minimum(np.floor(target).astype(np.int64), sizes)
    counts = np.maximum(counts, np.minimum(1, total // len(sizes)))
    # Largest remainder: hand out (or take back) the rounding difference one entry at a time.
    order = np.argsort(-(target - np.floor(target)), kind="stable")
    i = 0
    while counts.sum() != total:
        j = order[i % len(order)]
        if counts.sum() < total and counts[j] < sizes[j]:
            counts[j] += 1
        elif counts.sum() > total and counts[j] > 1:
            counts[j] -= 1
        i += 1
    return counts


def allocate_budget(sizes, connectivity, mode="global", profile=None):
    """Exact connection budgets for layers with ``sizes`` prunable entries at connectivity ``c``.

    ``mode="global"`` (the authors' choice): one budget int(c·Σ sizes) shared by all layers; the initial
    per-layer counts follow ``profile`` (initial per-layer fractions, e.g. denser first and last layers),
    adjusted so that they already sum to the budget (see :func:`_counts_for_total`). ``mode="layer"``:
    every layer keeps exactly round(c·n_l) (at least 1) on its own.
    """
    check_fraction(connectivity)
    if mode not in BUDGET_MODES:
        raise ConfigError(f"budget must be one of {BUDGET_MODES}. Received: budget={mode!r}")
    sizes = [int(n) for n in sizes]
    if mode == "layer":
        counts = tuple(max(1, int(round(connectivity * n))) for n in sizes)
        return Allocation(counts, tuple((i,) for i in range(len(sizes))), counts)
    total = max(len(sizes), int(connectivity * sum(sizes)))
    profile = [connectivity] * len(sizes) if profile is None else list(profile)
    if len(profile) != len(sizes):
        raise ConfigError(f"profile has {len(profile)} entries for {len(sizes)} sparse layers")
    counts = tuple(int(c) for c in _counts_for_total(sizes, profile, total))
    return Allocation(counts, (tuple(range(len(sizes))),), (total,))


def configure_connectivity(model, connectivity, mode="global", profile=None, seed=0):
    """Re-initialise every sparse layer of ``model`` with its exact initial count; returns the Allocation."""
    layers = sparse_layers(model)
    if not layers:
        raise ConfigError("the model has no sparse layers (built with method=dense or connectivity=1?)")
    alloc = allocate_budget([l.kernel_size_total for l in layers], connectivity, mode, profile)
    for i, (layer, n) in enumerate(zip(layers, alloc.counts)):
        layer.reset_connectivity(n, seed=seed * 1000 + i)
    return alloc


def optimizer_slots(optimizer, variable):
    """Every slot variable (momentum, velocity, …) the Keras 3 ``optimizer`` keeps for ``variable``.

    Keras 3 optimizers keep per-variable slots in lists aligned with their trainable variables; we find
    those lists generically so any optimizer (SGD, Adam, …) has its slots reset on death and regrowth.
    """
    if not optimizer.built:
        raise RuntimeError("build the optimizer before resolving its slots")
    index = optimizer_variable_index(optimizer, variable)
    trainable = optimizer_trainable_variables(optimizer)
    n = len(trainable)
    slots = []
    for value in vars(optimizer).values():
        if (isinstance(value, list) and len(value) == n and value
                and all(isinstance(v, keras.Variable) for v in value)
                and not any(v is t for v, t in zip(value, trainable))):
            slot = value[index]
            if tuple(slot.shape) == tuple(variable.shape):
                slots.append(slot)
    return slots


class ConnectivitySampler:
    """Keeps the active-connection count of each budget group fixed; runs inside ``tf.function``.

    Args:
        layers: the sparse layers (see :func:`bcs_tf.layers.sparse_layers`).
        allocation: groups and budgets from :func:`allocate_budget`.
        temperature: Langevin temperature T; the noise on active θ is sqrt(2·η_t·T)·N(0, 1).
            The authors' ``noise_scaling`` σ (noise η_t·σ·N(0,1)) equals T = η_0·σ²/2 at the initial rate.
        rewire: True for BCS; False keeps the initial random mask fixed (random-static baseline).
        seed: int seed of the sampler's random stream (a Keras SeedGenerator, saved with the weights).
    """

    def __init__(self, layers, allocation, temperature=0.0, rewire=True, seed=0, seed_generator=None):
        if temperature < 0:
            raise ConfigError(f"temperature must be ≥ 0. Received: temperature={temperature}")
        self.layers = list(layers)
        self.allocation = allocation
        self.temperature = float(temperature)
        self.rewire = bool(rewire)
        self.seed_generator = seed_generator or keras.random.SeedGenerator(seed)
        self._slots = None

    def bind_optimizer(self, optimizer):
        """Resolve the optimizer slots of every θ (the optimizer must be built)."""
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer keeps no slots itself
        self._slots = [optimizer_slots(optimizer, layer.theta) for layer in self.layers]

    def active_masks(self):
        """Boolean masks of the active entries, one per layer (call before the optimizer step)."""
        return [layer.theta.value > 0 for layer in self.layers]

    def after_update(self, active_before, learning_rate):
        """Apply noise, deaths (or sign flips when static) and rewiring after an optimizer step.

        Work is done in the index space of the previously active entries (≈ c·N of them): only those can
        change, since dormant entries have zero gradient, zero slots and θ = 0.
        """
        if self._slots is None:
            raise RuntimeError("call bind_optimizer() before after_update()")
        noise_std = tf.sqrt(2.0 * tf.cast(learning_rate, tf.float32) * self.temperature)
        active_counts = []
        for layer, was_active, slots in zip(self.layers, active_before, self._slots):
            idx = tf.where(was_active)
            values = tf.gather_nd(layer.theta.value, idx)
            if self.rewire and self.temperature > 0:
                values = values + noise_std * keras.random.normal(tf.shape(values), seed=self.seed_generator)
            crossed = values <= 0
            crossed_idx = tf.boolean_mask(idx, crossed)
            if self.rewire:  # crossing zero = death: θ = 0 and every slot reset
                new_values = tf.where(crossed, 0.0, values)
                slot_update = lambda slot: tf.zeros_like(tf.gather_nd(slot, crossed_idx))  # noqa: E731
                active_counts.append(tf.shape(idx)[0] - tf.math.count_nonzero(crossed, dtype=tf.int32))
            else:  # static mask: θ and its slots change sign together with γ (unconstrained weight)
                new_values = tf.maximum(tf.abs(values), REGROW_VALUE)
                slot_update = lambda slot: -tf.gather_nd(slot, crossed_idx)  # noqa: E731
                layer.sign.assign(tf.tensor_scatter_nd_update(
                    layer.sign.value, crossed_idx, -tf.gather_nd(layer.sign.value, crossed_idx)))
            layer.theta.assign(tf.tensor_scatter_nd_update(layer.theta.value, idx, new_values))
            for slot in slots:
                slot.assign(tf.tensor_scatter_nd_update(slot.value, crossed_idx, slot_update(slot.value)))
        if self.rewire:
            for group, budget in zip(self.allocation.groups, self.allocation.budgets):
                missing = budget - tf.add_n([active_counts[i] for i in group])
                self._regrow([self.layers[i] for i in group], missing)

    def _sample_dormant(self, flat, k):
        """k distinct dormant (θ = 0) positions of ``flat``, uniformly without replacement.

        Draws i.i.d. uniform positions and keeps, in order, each dormant one not kept before: every kept
        position is uniform over the dormant ones still available. Falls back to one exact top-k over
        uniform scores when the draws did not yield k of them (dense-ish layers).
        """
        n = tf.shape(flat)[0]
        draws = keras.random.randint([4 * k + 64], 0, n, seed=self.seed_generator, dtype="int32")
        dormant_draws = tf.boolean_mask(draws, tf.gather(flat, draws) <= 0)
        candidates, _ = tf.unique(dormant_draws)

        def exact():
            scores = tf.where(flat > 0, -1.0, keras.random.uniform(tf.shape(flat), seed=self.seed_generator))
            return tf.math.top_k(scores, k=k).indices

        return tf.cond(tf.shape(candidates)[0] >= k, lambda: candidates[:k], exact)

    def _regrow(self, layers, missing):
        def grow():
            flat = tf.concat([tf.reshape(layer.theta.value, [-1]) for layer in layers], axis=0)
            chosen = self._sample_dormant(flat, missing)
            offset = 0
            for layer in layers:
                n = layer.kernel_size_total
                local = tf.boolean_mask(chosen - offset, (chosen >= offset) & (chosen < offset + n))
                theta = tf.reshape(layer.theta.value, [-1])
                theta = tf.tensor_scatter_nd_update(theta, local[:, None], tf.fill(tf.shape(local), REGROW_VALUE))
                layer.theta.assign(tf.reshape(theta, layer.theta.shape))
                offset += n
            return missing

        tf.cond(missing > 0, grow, lambda: missing)

def connectivity_report(model):
    """Per-layer and global measured connectivity of ``model``'s sparse layers (a JSON-friendly dict)."""
    layers = sparse_layers(model)
    per_layer = {}
    active_total, size_total = 0, 0
    for layer in layers:
        a, n = layer.active_count(), layer.kernel_size_total
        per_layer[layer.name] = {"active": a, "size": n, "connectivity": a / n}
        active_total, size_total = active_total + a, size_total + n
    return {
        "layers": per_layer,
        "active": active_total,
        "size": size_total,
        "connectivity": active_total / size_total if size_total else 1.0,
    }


def temperature_from_sigma(sigma, learning_rate):
    """Temperature T whose SGLD noise sqrt(2ηT) equals the authors' η·σ at learning rate η."""
    return learning_rate * sigma ** 2 / 2.0
