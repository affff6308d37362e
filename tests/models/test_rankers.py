"""Ranking mode: rating requests, target-aware HSTU, and the rating task through the Trainer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.data.rating_requests import eval_requests, rating_split, train_requests
from recjax.data.synthetic import make_synthetic
from recjax.layers.target_aware import candidate_attention_mask
from recjax.models.hstu import HSTU, HSTUConfig
from recjax.models.lime import LIME, LimeConfig
from recjax.models.rankers import HSTURanker, RatingRankingTask, SASRecRanker
from recjax.models.sasrec import SASRecConfig
from recjax.train.trainer import TrainConfig, Trainer


def _rated(num_users=96, num_items=40, seed=0):
    base = make_synthetic(seed, num_users=num_users, num_items=num_items, min_len=25, max_len=35)
    # A learnable label: even item ids are liked (rating 5), odd ones not (rating 2).
    ratings = tuple(np.where(s % 2 == 0, 5.0, 2.0).astype(np.float32) for s in base.sequences)
    return dataclasses.replace(base, ratings=ratings)


def test_rating_split_blocks_and_requests():
    ds = _rated()
    split = rating_split(ds, holdout=4, threshold=4.0)
    u = int(split.eval_users[0])
    seq, n = ds.sequences[u], len(ds.sequences[u])
    test = eval_requests(split, "test", max_len=50)
    valid = eval_requests(split, "valid", max_len=50)
    np.testing.assert_array_equal(test["candidates"][0], seq[n - 4 :])
    np.testing.assert_array_equal(valid["candidates"][0], seq[n - 8 : n - 4])
    hist = test["inputs"][0][test["mask"][0]]
    np.testing.assert_array_equal(hist, seq[: n - 4])  # the validation block is part of the test history
    np.testing.assert_array_equal(test["labels"][0], (seq[n - 4 :] % 2 == 0).astype(np.float32))
    a = train_requests(split, 50, 5, 3, seed=1, epoch=2)
    b = train_requests(split, 50, 5, 3, seed=1, epoch=2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # Training candidates never reach the held-out blocks.
    for row in range(len(a["user"])):
        user = int(a["user"][row])
        train_items = set(ds.sequences[user][: split.train_len[user]].tolist())
        assert set(a["candidates"][row][a["candidate_mask"][row]].tolist()) <= train_items
    with pytest.raises(ValueError, match="has no ratings"):
        rating_split(dataclasses.replace(ds, ratings=None))


def test_hstu_candidates_are_independent_and_match_a_dense_mask():
    cfg = HSTUConfig(num_items=30, max_len=10, embed_dim=8, attention_dim=8, linear_dim=8, dropout=0.0,
                     use_relative_bias=False)  # fmt: skip
    model = HSTU(cfg, rngs=nnx.Rngs(0))
    model.eval()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 31, (2, 10)), jnp.int32).at[0, :3].set(0)
    mask = ids != 0
    cand = jnp.asarray([[3, 4, 5], [6, 7, 8]], jnp.int32)
    hidden, out = model.with_candidates(ids, mask, cand)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(model(ids, mask)), rtol=1e-5, atol=1e-6)
    _, other = model.with_candidates(ids, mask, cand.at[:, 1:].set(9))  # change the other candidates
    np.testing.assert_allclose(np.asarray(other[:, 0]), np.asarray(out[:, 0]), rtol=1e-5, atol=1e-6)
    # Dense reference: the joint sequence with "candidate sees the history and itself" written out.
    L, C = 10, 3
    x = jnp.concatenate([model.embedding(ids, mask), model.embedding.items[...][cand] * jnp.sqrt(8.0)], 1)
    valid = jnp.concatenate([mask, jnp.ones((2, C), bool)], 1)
    allowed = candidate_attention_mask(mask, jnp.ones((2, C), bool))
    for block in model.blocks:
        x = block(x, valid, allowed, None)
    np.testing.assert_allclose(np.asarray(x[:, L:]), np.asarray(out), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lime", "hstu", "sasrec"])
def test_rankers_learn_the_labels_through_the_trainer(name, tmp_path):
    ds = _rated()
    split = rating_split(ds, holdout=4)
    common = dict(num_items=ds.num_items, max_len=24, embed_dim=16, dropout=0.0)
    if name == "lime":
        model = LIME(
            LimeConfig(**common, num_links=4, attention_dim=8, linear_dim=8, scorer="mlp"), rngs=nnx.Rngs(0)
        )
    elif name == "hstu":
        model = HSTURanker(HSTUConfig(**common, attention_dim=8, linear_dim=8), rngs=nnx.Rngs(0))
    else:
        model = SASRecRanker(SASRecConfig(**common, ffn_hidden_dim=16), rngs=nnx.Rngs(0))
    task = RatingRankingTask(split, max_len=24, batch_size=64, eval_batch_size=64, num_candidates=4)
    cfg = TrainConfig(batch_size=64, num_epochs=4, progress=False, eval_batch_size=64, learning_rate=3e-3)
    result = Trainer(model, task, cfg, tmp_path).fit()
    assert result["test"]["auc"] > 0.8, result["test"]  # chance is 0.5
    assert np.isfinite(result["test"]["gauc"]) and result["test"]["ne"] < 1.0
    with pytest.raises(TypeError, match="candidate_logits"):
        task.check_model(object())
    jax.clear_caches()


def test_rating_task_refuses_ne_for_early_stopping_and_a_model_of_another_catalogue():
    split = rating_split(_rated(), holdout=4)
    with pytest.raises(ValueError, match="early_stop_metric: expected one of \\['auc', 'gauc'\\]"):
        RatingRankingTask(split, max_len=24, batch_size=64, early_stop_metric="ne")
    task = RatingRankingTask(split, max_len=24, batch_size=64)
    wrong = HSTURanker(
        HSTUConfig(num_items=split.dataset.num_items + 1, max_len=24, embed_dim=8), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="model.config.num_items: expected the dataset's"):
        task.check_model(wrong)
