import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from bcs_tf.robustness.attacks import AttackConfig
from bcs_tf.connectivity import ConnectivitySampler, allocate_budget, optimizer_slots
from bcs_tf.layers import SparseDense, sparse_layers
from bcs_tf.objectives import make_objective
from bcs_tf.trainer import RobustTrainer
from conftest import rewiring_steps, tiny_sparse_net


def _allocate(net, c, mode):
    layers = sparse_layers(net)
    alloc = allocate_budget([l.kernel_size_total for l in layers], c, mode)
    for layer, n in zip(layers, alloc.counts):
        layer.reset_connectivity(n)
    return alloc


def _trainer(mode="global", lr=0.5, temperature=1e-4, alpha=0.0, rewire=True, objective="natural"):
    net = tiny_sparse_net()
    alloc = _allocate(net, 0.2, mode)
    trainer = RobustTrainer(net, make_objective(objective), AttackConfig(0.1, 0.05, 2), allocation=alloc,
                            rewire=rewire, temperature=temperature, alpha=alpha)
    trainer.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9, weight_decay=0.01), jit_compile=False)
    trainer.prepare()
    return trainer, alloc


def _group_counts(trainer, alloc):
    counts = [int(np.count_nonzero(np.asarray(l.theta) > 0)) for l in trainer.sampler.layers]
    return [sum(counts[i] for i in g) for g in alloc.groups]


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 8, 8, 1)).astype("float32"), rng.integers(0, 4, n).astype("int32")


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_count_equals_budget_after_every_step(mode):
    trainer, alloc = _trainer(mode, lr=2.0)  # a large rate kills many connections per step
    signs = [np.asarray(l.sign).copy() for l in trainer.sampler.layers]
    x, y = _data()
    died = 0
    for step, dead in rewiring_steps(trainer, x, y, 40):
        died += dead
        assert _group_counts(trainer, alloc) == list(alloc.budgets), f"step {step}"
        for layer, s in zip(trainer.sampler.layers, signs):
            theta, kernel = np.asarray(layer.theta), np.asarray(layer.kernel)
            assert np.all(kernel[theta <= 0] == 0.0)
            np.testing.assert_array_equal(np.asarray(layer.sign), s)  # signs never change under BCS
    assert died > 20, "the test needs steps in which connections actually die"


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_mass_death_is_refilled_and_slots_reset(mode):
    trainer, alloc = _trainer(mode)
    x, y = _data()
    trainer.train_on_batch(x[:16], y[:16])  # non-zero momentum everywhere active
    sampler = trainer.sampler
    masks = sampler.active_masks()
    for layer in sampler.layers:  # kill 90% of all active entries at once
        theta = np.asarray(layer.theta).copy()
        active = np.flatnonzero(theta > 0)
        theta.flat[active[: int(0.9 * len(active))]] = -0.5
        layer.theta.assign(theta)
    sampler.after_update(masks, 0.1)
    assert _group_counts(trainer, alloc) == list(alloc.budgets)
    for layer in sampler.layers:
        theta = np.asarray(layer.theta)
        for slot in optimizer_slots(trainer.optimizer, layer.theta):
            assert np.all(np.asarray(slot)[theta <= 0] == 0.0)
            assert np.all(np.asarray(slot)[theta == 1e-12] == 0.0)  # regrown entries start with zero momentum
        assert np.all(theta[theta <= 0] == 0.0)


@pytest.mark.parametrize("budget,killed", [(20, 20), (190, 10)])
def test_regrowth_picks_dormant_entries_uniformly(budget, killed):
    """(20, 20): 20 regrown among 200 dormant (rejection sampler); (190, 10): 10 among only 20 dormant,
    where the draws rarely find enough and the exact top-k fallback runs."""
    layer = SparseDense(20, connectivity=0.1, seed=0)
    layer.build((None, 10))  # 200 entries
    alloc = allocate_budget([200], budget / 200, "layer")
    sampler = ConnectivitySampler([layer], alloc, temperature=0.0, seed=5)
    sampler._slots = [[]]
    base = np.zeros(200, "float32")
    base[:budget] = 1.0
    dormant_after_kill = np.arange(budget - killed, 200)
    hits = np.zeros(200)
    trials = 400
    for _ in range(trials):
        layer.theta.assign(base.reshape(10, 20))
        masks = sampler.active_masks()
        theta = base.copy()
        theta[budget - killed:budget] = -1.0  # these die in this step
        layer.theta.assign(theta.reshape(10, 20))
        sampler.after_update(masks, 0.1)
        active = np.asarray(layer.theta).reshape(-1) > 0
        assert active.sum() == budget
        assert active[: budget - killed].all()  # survivors untouched
        hits += active
    observed = hits[dormant_after_kill]
    _, p = stats.chisquare(observed)  # uniform: every dormant entry equally often
    assert p > 1e-3, (p, observed)
    np.testing.assert_allclose(observed.sum(), trials * killed)


def test_weight_decay_prior_and_l1_prior_shrink_active_theta():
    x, y = _data()
    shrink = {}
    for alpha in (0.0, 0.5):
        trainer, _ = _trainer(temperature=0.0, alpha=alpha, lr=0.05)
        theta0 = [np.asarray(l.theta).copy() for l in trainer.sampler.layers]
        trainer.optimizer.learning_rate.assign(0.05)
        trainer.train_on_batch(x[:16], y[:16])
        # Entries that stay active: mean change relative to the unregularised gradient step.
        shrink[alpha] = np.mean([np.sum(np.asarray(l.theta)[t0 > 0]) - np.sum(t0[t0 > 0])
                                 for l, t0 in zip(trainer.sampler.layers, theta0)])
    assert shrink[0.5] < shrink[0.0]


def test_langevin_noise_has_the_documented_scale():
    layer = SparseDense(100, connectivity=1.0, seed=0)
    layer.build((None, 100))
    layer.theta.assign(np.full((100, 100), 10.0, "float32"))
    alloc = allocate_budget([10000], 1.0, "layer")
    lr, temperature = 0.1, 0.02
    sampler = ConnectivitySampler([layer], alloc, temperature=temperature, seed=1)
    sampler._slots = [[]]
    sampler.after_update(sampler.active_masks(), lr)
    delta = np.asarray(layer.theta) - 10.0
    expected = np.sqrt(2 * lr * temperature)
    assert abs(delta.std() / expected - 1) < 0.05 and abs(delta.mean()) < 0.05 * expected
    # No noise at T = 0.
    sampler0 = ConnectivitySampler([layer], alloc, temperature=0.0, seed=1)
    sampler0._slots = [[]]
    before = np.asarray(layer.theta).copy()
    sampler0.after_update(sampler0.active_masks(), lr)
    np.testing.assert_array_equal(np.asarray(layer.theta), before)


def test_static_mode_keeps_the_mask_and_flips_signs_instead_of_dying():
    trainer, alloc = _trainer(rewire=False, lr=2.0)
    masks0 = [np.asarray(l.theta) > 0 for l in trainer.sampler.layers]
    signs0 = [np.asarray(l.sign).copy() for l in trainer.sampler.layers]
    x, y = _data()
    for step in range(10):
        trainer.train_on_batch(x[:16], y[:16])
    flipped = 0
    for layer, m0, s0 in zip(trainer.sampler.layers, masks0, signs0):
        np.testing.assert_array_equal(np.asarray(layer.theta) > 0, m0)
        flipped += int(np.sum(np.asarray(layer.sign) != s0))
        np.testing.assert_array_equal(np.asarray(layer.sign)[~m0], s0[~m0])
    assert flipped > 0


def test_sampler_runs_inside_tf_function():
    trainer, alloc = _trainer()
    sampler = trainer.sampler

    @tf.function
    def step():
        masks = sampler.active_masks()
        for layer in sampler.layers:
            layer.theta.assign(layer.theta - 0.05)
        sampler.after_update(masks, 0.1)

    for _ in range(5):
        step()
        assert _group_counts(trainer, alloc) == list(alloc.budgets)
