"""Prioritized embedding lookups (recjax/sharding/prefetch.py) give the losses, parameters and optimizer
state of synchronous training on a 4 x 2 mesh with a row-sharded table: with a row-sparse ("lazy") Adam
(most ids exclusive, the compacted critical-path lookup) and with dense AdamW (almost every row changes:
the full-lookup fallback); through the Trainer's loop (fit) too. The row-sparse optimizer leaves rows
without gradient untouched; ids the model did not prefetch are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.data import synthetic
from recjax.data.splits import leave_one_out
from recjax.models.registry import build_model
from recjax.sharding import embedding as E
from recjax.sharding import mesh as mesh_lib
from recjax.sharding import prefetch as P
from recjax.train.tasks import NextItemTask
from recjax.train.trainer import TrainConfig, Trainer, make_optimizer

TABLE = ("embedding", "items")


def _trainer(path, optimizer, prefetch, epochs=2):
    split = leave_one_out(synthetic.make_synthetic(num_users=96, num_items=255, min_len=4, max_len=12))
    cfg = TrainConfig(batch_size=32, eval_batch_size=32, num_epochs=epochs, ks=(5,), early_stop_metric="hr@5",
                      progress=False, eval_every_epochs=0, checkpoint_every_epochs=0)  # fmt: skip
    task = NextItemTask.from_config(split, cfg, max_len=10)
    model = build_model("sasrec", split.num_items, max_len=10, rngs=nnx.Rngs(0), embed_dim=8, num_blocks=1,
                        dropout=0.0)  # fmt: skip
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(data=4, model=2))
    opt = make_optimizer(cfg) if optimizer == "dense" else P.lazy_rows(make_optimizer(cfg), [TABLE])
    plan = E.EmbeddingPlan.from_config({"items": "row"})
    return Trainer(model, task, cfg, path, optimizer=opt, mesh=mesh, embedding_plan=plan, prefetch=prefetch)


def _batches(trainer, epochs=2):
    return [b for e in range(epochs) for b in trainer.task.train_batches(e, 0)]


def _synchronous(path, optimizer):
    sync = _trainer(path, optimizer, None)
    state, losses = sync.state, []
    for b in _batches(sync):
        state, m = sync.train_step(state, mesh_lib.shard_batch(b, sync.mesh))
        losses.append(float(m["loss"]))
    sync.close()
    return losses, jax.device_get((state.params, state.opt_state))


@pytest.fixture(scope="module")
def lazy_reference(tmp_path_factory):
    return _synchronous(tmp_path_factory.mktemp("sync"), "lazy")


def _assert_same_state(got, ref):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer, capacity", [("lazy", 0.6), ("dense", 0.25)])
def test_prioritized_lookups_equal_synchronous_training(tmp_path, request, optimizer, capacity):
    if optimizer == "lazy":
        ref_losses, ref = request.getfixturevalue("lazy_reference")
    else:
        ref_losses, ref = _synchronous(tmp_path / "sync", optimizer)
    pre = _trainer(tmp_path / "pre", optimizer, P.PrefetchConfig(capacity=capacity))
    state, losses, stats = pre.state, [], []
    for e in range(2):  # epoch by epoch, as the Trainer's loop: the last batch prefetches nothing
        for b, nxt in P.lookahead(pre.task.train_batches(e, 0)):
            state, m = pre.prefetcher.step(state, b, nxt)
            losses.append(float(m["loss"]))
            stats.append((float(m["prefetch/collision_fraction"]), float(m["prefetch/fallback"])))
    pre.prefetcher.check()
    got = jax.device_get((state.params, state.opt_state))
    pre.close()
    # The rows are exact copies (losses agree to 1e-6); the table gradient's summation order may differ.
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    _assert_same_state(got, ref)
    frac = np.array(stats)
    if optimizer == "lazy":  # rows outside the batch keep their values: exclusive ids, compact path taken
        assert 0 < frac[:, 0].min() and frac[:, 0].max() < 1 and (frac[:, 1] == 0).any(), frac
    else:  # dense Adam moves every row with non-zero moments: every real id collides (the left padding,
        # id 0, never gets a gradient), more than the 0.25 slots: the full-lookup fallback
        assert (frac[1:, 1] == 1).all(), frac


def test_fit_with_prefetch_matches_synchronous_steps(tmp_path, lazy_reference):
    pre = _trainer(tmp_path / "fit", "lazy", P.PrefetchConfig(capacity=0.6))
    pre.fit()
    _assert_same_state(jax.device_get((pre.state.params, pre.state.opt_state)), lazy_reference[1])


def test_lazy_rows_leave_rows_without_gradient_untouched():
    params = {"embedding": {"items": jnp.ones((4, 2))}, "w": jnp.ones((2, 2))}
    opt = P.lazy_rows(optax.adam(0.1), [TABLE])
    ref_opt = optax.adam(0.1)
    state, ref_state = opt.init(params), ref_opt.init(params)
    g1 = {"embedding": {"items": jnp.array([[1.0, 0], [0, 0], [0, 0], [0, 2]])}, "w": jnp.ones((2, 2))}
    g2 = {"embedding": {"items": jnp.array([[0.0, 0], [3, 0], [0, 0], [0, 0]])}, "w": jnp.zeros((2, 2))}
    p, rp = params, params
    for g in (g1, g2):
        u, state = opt.update(g, state, p)
        ru, ref_state = ref_opt.update(g, ref_state, rp)
        p, rp = optax.apply_updates(p, u), optax.apply_updates(rp, ru)
    items, ref_items = np.asarray(p["embedding"]["items"]), np.asarray(rp["embedding"]["items"])
    np.testing.assert_array_equal(items[2], [1.0, 1.0])  # never a gradient: untouched
    np.testing.assert_allclose(items[1], ref_items[1] * 0 + items[1])
    assert not np.allclose(ref_items[0], items[0])  # dense Adam moved row 0 at step 2, lazy did not
    np.testing.assert_allclose(p["w"], rp["w"])  # parameters outside the tables: plain Adam
    mu = np.asarray(state[0].mu["embedding"]["items"])
    np.testing.assert_array_equal(mu[2], 0.0)


def test_prefetch_of_other_ids_refused(tmp_path):
    pre = _trainer(tmp_path / "bad", "lazy", P.PrefetchConfig(ids_key="targets"), epochs=1)
    with pytest.raises(ValueError, match="prefetch: the model looked up other ids"):
        state = pre.state
        for b, nxt in P.lookahead(pre.task.train_batches(0, 0)):
            state, _ = pre.prefetcher.step(state, b, nxt)
        pre.prefetcher.check()
    pre.close()
    with pytest.raises(ValueError, match=r"prefetch.capacity"):
        P.PrefetchConfig(capacity=0.0)


def test_prefetch_refused_for_a_task_with_its_own_prepare(tmp_path, monkeypatch):
    # A prepare may rewrite the table or the ids before the step (an ID remapper, MFLI's k-means): the rows
    # carried from the previous step would then be stale.
    monkeypatch.setattr(NextItemTask, "prepare", lambda self, *a: a[:4] + ({},), raising=True)
    with pytest.raises(ValueError, match="prefetch: NextItemTask overrides Task.prepare"):
        _trainer(tmp_path / "prep", "lazy", P.PrefetchConfig(capacity=0.6), epochs=1)
