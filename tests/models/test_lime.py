"""LIME: the XOR mask, the item cache, left-padding independence, request sharing, bad input, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.data.splits import leave_one_out
from recjax.data.synthetic import make_synthetic
from recjax.layers.lime import LinkEmbeddings, xor_pointwise_attention
from recjax.models.lime import LIME, LimeConfig, LimeNextItemTask, user_feature_matrix, user_feature_sizes
from recjax.train.item_version import advance_item_versions, next_tag
from recjax.train.trainer import TrainConfig, Trainer

NUM_ITEMS, MAX_LEN = 60, 12


def _model(attention="xor", seed=0, **kw) -> LIME:
    cfg = LimeConfig(
        num_items=NUM_ITEMS, max_len=MAX_LEN, embed_dim=16, num_links=4, attention=attention, num_layers=2,
        attention_dim=8, linear_dim=8, ffn_hidden_dim=16, dropout=0.0, **kw,
    )  # fmt: skip
    model = LIME(cfg, rngs=nnx.Rngs(seed))
    model.eval()
    return model


def _history(seed=0, batch=3, length=MAX_LEN):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, NUM_ITEMS + 1, (batch, length)).astype(np.int32)
    ids[0, :4] = 0  # a left-padded row
    return jnp.asarray(ids), jnp.asarray(ids != 0)


def test_xor_attention_blocks_history_to_history():
    """Perturbing history item j changes another history position's output only through the links: with
    the links' keys and values held fixed, the history output does not move at all; the links' does."""
    rng = np.random.default_rng(1)
    B, R, L, H, A = 2, 3, 7, 2, 4
    q_l, k_l, v_l = (jnp.asarray(rng.normal(size=(B, R, H, A)), jnp.float32) for _ in range(3))
    q_h, k_h, v_h = (jnp.asarray(rng.normal(size=(B, L, H, A)), jnp.float32) for _ in range(3))
    valid = jnp.ones((B, L), bool)
    links0, hist0 = xor_pointwise_attention(q_l, k_l, v_l, q_h, k_h, v_h, valid, L)
    k_h2 = k_h.at[:, 2].add(1.0)
    v_h2 = v_h.at[:, 2].add(1.0)
    links1, hist1 = xor_pointwise_attention(q_l, k_l, v_l, q_h, k_h2, v_h2, valid, L)
    np.testing.assert_array_equal(np.asarray(hist1), np.asarray(hist0))  # no history<->history path
    assert float(jnp.max(jnp.abs(links1 - links0))) > 1e-3  # links read the history
    # Against a dense reference: the joint sequence with the XOR mask written out.
    z_q = jnp.concatenate([q_l, q_h], 1)
    z_k = jnp.concatenate([k_l, k_h], 1)
    z_v = jnp.concatenate([v_l, v_h], 1)
    is_link = jnp.arange(R + L) < R
    xor_mask = is_link[:, None] != is_link[None, :]
    w = jax.nn.silu(jnp.einsum("bthd,bshd->bhts", z_q, z_k))
    norm = jnp.where(is_link, L, R)[:, None]  # links sum over L items / L here, history over R links / R
    w = jnp.where(xor_mask, w, 0.0) / norm
    dense = jnp.einsum("bhts,bshd->bthd", w, z_v)
    np.testing.assert_allclose(np.asarray(links0), np.asarray(dense[:, :R]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(hist0), np.asarray(dense[:, R:]), rtol=1e-5, atol=1e-6)


def test_model_history_interacts_only_through_links():
    """In a 1-layer XOR model the links are the output; in the model, changing one history item changes
    the personal links (it is read) -- and with the links' attention weights for that item zeroed by the
    mask (the item hidden), nothing moves."""
    model = _model(num_position_buckets=0)
    ids, mask = _history()
    base = model(ids, mask)
    changed = model(ids.at[1, 5].set(ids[1, 5] % NUM_ITEMS + 1), mask)
    assert float(jnp.max(jnp.abs(changed[1] - base[1]))) > 1e-6
    np.testing.assert_allclose(np.asarray(changed[0]), np.asarray(base[0]), atol=1e-6)  # other rows
    hidden = mask.at[1, 5].set(False)
    a = model(ids, hidden)
    b = model(ids.at[1, 5].set(ids[1, 5] % NUM_ITEMS + 1), hidden)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("attention", ["xor", "mha"])
def test_outputs_do_not_depend_on_left_padding(attention):
    model = _model(attention)
    ids, mask = _history(length=8)
    padded = jnp.pad(ids, ((0, 0), (4, 0)))
    np.testing.assert_allclose(
        np.asarray(model(padded, padded != 0)), np.asarray(model(ids, mask)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("attention", ["xor", "mha"])
def test_shared_requests_equal_separate_prefixes(attention):
    """K prefixes of one sequence in one call == each prefix alone (right part masked)."""
    model = _model(attention)
    ids, mask = _history()
    cuts = jnp.asarray([[11, 7], [11, 3], [11, 9]], jnp.int32)
    shared = model(ids, mask, cuts_BxK=cuts)
    for k in range(cuts.shape[1]):
        alone = model(ids, mask & (jnp.arange(MAX_LEN)[None] <= cuts[:, k : k + 1]))
        np.testing.assert_allclose(np.asarray(shared[:, k]), np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_cached_scores_equal_on_the_fly_and_stale_cache_is_rejected():
    model = _model(scorer="mlp")
    ids, mask = _history()
    personal = model(ids, mask)
    cache = model.build_item_cache()
    cand = jnp.asarray([[1, 5, 9], [2, 2, 60], [7, 8, 3]], jnp.int32)
    np.testing.assert_allclose(
        np.asarray(model.score_cached(personal, cache, cand)),
        np.asarray(model.score(personal, cand)),
        rtol=1e-5,
    )
    every = model.score_cached(personal, cache)
    assert every.shape == (3, NUM_ITEMS + 1)
    np.testing.assert_allclose(
        np.asarray(every[:, 1:]), np.asarray(model.score(personal, jnp.arange(1, NUM_ITEMS + 1))), rtol=1e-5
    )
    # in item blocks (a ragged last one), eagerly and under jit: the same scores
    chunked = model.score_cached(personal, cache, item_chunk=7)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(every), rtol=1e-5, atol=1e-6)
    gd, st = nnx.split(model)
    jitted = jax.jit(lambda s, c: nnx.merge(gd, s).score_cached(personal, c, item_chunk=7))(st, cache)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(every), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="item_chunk"):
        model.score_cached(personal, cache, item_chunk=0)
    tag = int(model.item_version[...])
    advance_item_versions(model)  # what every training step does
    with pytest.raises(ValueError, match=rf"cache: built at item version {tag}, the model is at \d+"):
        model.score_cached(personal, cache, cand)
    # Another model (here another seed; the same seed would do too) does not accept this model's cache.
    other = _model(scorer="mlp", seed=1)
    with pytest.raises(ValueError, match="or it is another model"):
        other.score_cached(personal, model.build_item_cache(), cand)
    # Inside a jit the caller built, a stale cache cannot raise: every score is NaN (ranked last).
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, c: nnx.merge(graphdef, s).score_cached(personal, c, cand))(state, cache)
    assert bool(jnp.all(jnp.isnan(out)))


def test_bad_input_is_rejected_naming_the_argument():
    with pytest.raises(ValueError, match="lime.num_links"):
        LimeConfig(num_items=10, num_links=0)
    with pytest.raises(ValueError, match="lime.attention"):
        LimeConfig(num_items=10, attention="flash")
    with pytest.raises(ValueError, match="num_links"):
        LinkEmbeddings(-1, 8, rngs=nnx.Rngs(0))
    model = _model()
    ids, mask = _history(length=MAX_LEN)
    with pytest.raises(ValueError, match="inputs_BxL: expected L <= max_len"):
        model(jnp.pad(ids, ((0, 0), (1, 0))), jnp.pad(mask, ((0, 0), (1, 0))))
    with pytest.raises(ValueError, match="inputs_BxL"):
        model(ids.at[0, -1].set(NUM_ITEMS + 1), mask)
    with pytest.raises(ValueError, match=rf"cuts_BxK: expected values in \[0, {MAX_LEN}\)"):
        model(ids, mask, cuts_BxK=jnp.full((ids.shape[0], 2), MAX_LEN, jnp.int32))
    with pytest.raises(TypeError, match="cuts_BxK: expected signed integer"):
        model(ids, mask, cuts_BxK=jnp.zeros((ids.shape[0], 2), jnp.float32))
    with pytest.raises(ValueError, match="candidates"):
        model.score(model(ids, mask), jnp.asarray([0, 3], jnp.int32))
    ctx = _model(contextualize=True, user_feature_sizes=(2, 7))
    with pytest.raises(ValueError, match="user_features_BxU"):
        ctx(ids, mask)
    with pytest.raises(ValueError, match=r"user_features_BxU\[:, 1\]"):
        ctx(ids, mask, jnp.asarray([[1, 8], [2, 1], [1, 1]], jnp.int32))


def test_trains_through_the_trainer_and_beats_chance(tmp_path):
    ds = make_synthetic(0, num_users=300, num_items=80, min_len=10, max_len=30)
    split = leave_one_out(ds)
    features = user_feature_matrix(ds.user_features) if ds.user_features else None
    cfg = LimeConfig(
        num_items=ds.num_items, max_len=20, embed_dim=16, num_links=4, attention_dim=8, linear_dim=8,
        dropout=0.0, contextualize=features is not None,
        user_feature_sizes=user_feature_sizes(features) if features is not None else (),
    )  # fmt: skip
    task = LimeNextItemTask(
        split, max_len=20, batch_size=64, ks=(10,), user_features=features, cuts_per_sequence=4
    )  # 4 cuts compile faster than every position (K = L), tested in test_shared_requests_...; same model
    tcfg = TrainConfig(batch_size=64, num_epochs=3, progress=False, ks=(10,), eval_batch_size=96)
    model = LIME(cfg, rngs=nnx.Rngs(0))
    tag0 = np.uint32(model.item_version[...])
    trainer = Trainer(model, task, tcfg, tmp_path)
    results = trainer.fit()
    # Chance HR@10 is 10 / 80 = 0.125; the synthetic data's structure is learnt within 3 epochs.
    assert results["test"]["hr@10"] > 0.2, results["test"]

    def tag_after(steps):
        tag = tag0
        for _ in range(steps):
            tag = np.uint32(next_tag(jnp.uint32(tag)))
        return int(tag)

    # The Trainer advanced the tag once per step, and the best parameters keep the tag of their step.
    assert int(trainer.eval_model().item_version[...]) == tag_after(results["steps"])
    best_steps = results["steps"] // results["epochs"] * results["best_epoch"]
    assert int(trainer.best_model().item_version[...]) == tag_after(best_steps)
    # The best model reads the variables saved with the best parameters, not the current ones: after more
    # steps (one simulated here) the two differ.
    model_now = trainer.eval_model()
    advance_item_versions(model_now)
    trainer.state = trainer.state.replace(rest=nnx.split(model_now, nnx.Param, ...)[2])
    assert int(trainer.eval_model().item_version[...]) == tag_after(results["steps"] + 1)
    assert int(trainer.best_model().item_version[...]) == tag_after(best_steps)
    with pytest.raises(TypeError, match="LimeNextItemTask trains a LIME model"):
        task.check_model(object())
