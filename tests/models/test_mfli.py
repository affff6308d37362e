"""MFLI model + task: raw-only loss before the start step, label types, k-means init in the Trainer's prepare
hook, training through the Trainer, the experiment config, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.data.splits import leave_one_out
from recjax.data.synthetic import make_synthetic
from recjax.layers import residual_quantizer as rq
from recjax.models.mfli import MFLI, MFLIConfig, MFLITask, label_examples
from recjax.models.sasrec import SASRec
from recjax.train import losses
from recjax.train.tasks import LossConfig
from recjax.train.trainer import TrainConfig, Trainer

MAX_LEN = 12
LOSS = LossConfig(num_negatives=16)


@pytest.fixture(scope="module")
def split():
    return leave_one_out(make_synthetic(0, num_users=200, num_items=60, min_len=8, max_len=20))


def _model(num_items, **kw) -> MFLI:
    fields = dict(
        num_items=num_items, max_len=MAX_LEN, embed_dim=8, num_blocks=1, dropout=0.0, num_facets=2,
        num_levels=2, codebook_size=4, kmeans_iterations=3,
    ) | kw  # fmt: skip
    return MFLI(MFLIConfig(**fields), rngs=nnx.Rngs(0))


def _task(split, labels=(("any_rating", 1.0), ("rating_ge_4", 0.5)), **kw) -> MFLITask:
    return MFLITask(split, max_len=MAX_LEN, batch_size=32, label_weights=labels, loss=LOSS, ks=(10,), **kw)


def _batch(task):
    return {k: jnp.asarray(v) for k, v in next(iter(task.train_batches(0, 0))).items()}


# One model config and one jitted loss for the loss and Trainer tests: the loss compiles once (most of their
# time is XLA compilation). The loss task never goes to a Trainer (which would attach it to a mesh).
DELAYED = dict(start_step=6, level_schedule=(6, 12), usage_penalty=0.1)


@pytest.fixture(scope="module")
def loss_task(split):
    return _task(split)


@pytest.fixture(scope="module")
def loss_fn(loss_task):
    return nnx.jit(loss_task.loss)


def test_label_examples_follow_the_ratings(split):
    labels = label_examples(split, ["rating_ge_4", "any_rating", "next_item"], MAX_LEN)
    assert sorted(labels) == ["label_any_rating", "label_rating_ge_4"]
    ex = split.train_examples(MAX_LEN)
    for row in (0, 7, len(ex["user"]) - 1):
        u = int(ex["user"][row])
        seq, rat = split.train[u], np.asarray(split.dataset.ratings[u])[: len(split.train[u])]
        n = min(len(seq) - 1, MAX_LEN)
        np.testing.assert_array_equal(ex["targets"][row, -n:], seq[1:][-n:])
        np.testing.assert_array_equal(labels["label_rating_ge_4"][row, -n:], rat[1:][-n:] >= 4)
        assert labels["label_any_rating"][row, -n:].all() and not labels["label_any_rating"][row, :-n].any()


def test_loss_before_start_is_the_raw_softmax_per_label_type(split, loss_task, loss_fn):
    model = _model(split.num_items, **DELAYED)
    batch, rng = _batch(loss_task), jax.random.key(1)
    loss, metrics = loss_fn(model, {**batch, "quantizer_step": jnp.int32(5)}, rng)
    hidden = nnx.jit(lambda m, b: m(b["inputs"], b["mask"]))(model, batch)
    ssm = jax.jit(losses.sampled_softmax_loss, static_argnames="num_negatives")  # one compile, both types
    expected = 0.0
    for name, w in (("any_rating", 1.0), ("rating_ge_4", 0.5)):
        raw, _ = ssm(
            hidden, batch["targets"], batch["mask"] & batch[f"label_{name}"], model.item_embeddings(), rng,
            num_negatives=16,
        )  # fmt: skip
        expected += w * float(raw)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert int(metrics["rq/active_levels"]) == 0 and float(metrics["quantizer_loss"]) == 0.0
    # rating >= 4 positives are a strict subset of all ratings
    assert 0 < float(metrics["rating_ge_4/num_valid"]) < float(metrics["any_rating/num_valid"])
    assert int(model.quantizer.step[...]) == 5
    # From the start step on, the quantized softmax and the quantizer's loss are added (both levels at 12).
    loss5, metrics5 = loss_fn(model, {**batch, "quantizer_step": jnp.int32(12)}, rng)
    assert int(metrics5["rq/active_levels"]) == 2 and float(metrics5["quantizer_loss"]) > 0
    quant = sum(
        w * float(metrics5[f"{n}/quantized_loss"]) for n, w in (("any_rating", 1), ("rating_ge_4", 0.5))
    )
    assert float(loss5) == pytest.approx(expected + quant + float(metrics5["quantizer_loss"]), rel=1e-4)


def test_prepare_runs_kmeans_once_per_level_from_its_step(split):
    task = _task(split, labels=(("next_item", 1.0),))
    model = _model(split.num_items, start_step=3, level_schedule=(3, 6))
    task.check_model(model)
    _, params, _ = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def prepare(p, state, step):
        p, _, state, batch, _ = task.prepare(p, {}, state, {"x": jnp.zeros(2)}, jax.random.key(0), step)
        return p, state, batch

    def codebooks(p):
        return np.asarray(p["quantizer"]["codebooks"][...])

    s0 = task.init_state(params)
    cb0 = np.asarray(model.quantizer.codebooks_FxLxMxD)
    for step in (0, 2):  # before the start step: nothing changes
        p, s, batch = prepare(params, s0, jnp.int32(step))
        np.testing.assert_array_equal(codebooks(p), cb0)
        assert not np.asarray(s["levels_initialized"]).any() and int(batch["quantizer_step"]) == step
    p3, s3, _ = prepare(params, s0, jnp.int32(3))
    items, valid = model.quantizer_inputs()
    x = model.quantizer.facet_inputs(items)
    key = jax.random.key(model.quantizer.config.seed)
    ref = rq.kmeans_level(model.quantizer.codebooks_FxLxMxD, x, valid, 0, jax.random.fold_in(key, 0), 3, 8192)
    np.testing.assert_allclose(codebooks(p3), np.asarray(ref), atol=1e-5)
    np.testing.assert_array_equal(codebooks(p3)[:, 1], cb0[:, 1])  # level 1 waits for step 6
    assert np.asarray(s3["levels_initialized"]).tolist() == [True, False]
    np.testing.assert_array_equal(codebooks(prepare(p3, s3, jnp.int32(4))[0]), codebooks(p3))  # once only
    # A non-finite step 3 is thrown away with its task state: level 0 is still due at step 4.
    p4, s4, _ = prepare(params, s0, jnp.int32(4))
    np.testing.assert_allclose(codebooks(p4), np.asarray(ref), atol=1e-5)
    assert np.asarray(s4["levels_initialized"]).tolist() == [True, False]
    p6, s6, _ = prepare(p3, s3, jnp.int32(6))
    np.testing.assert_array_equal(codebooks(p6)[:, 0], codebooks(p3)[:, 0])
    assert not np.allclose(codebooks(p6)[:, 1], cb0[:, 1]) and np.asarray(s6["levels_initialized"]).all()


def test_trains_through_the_trainer(split, tmp_path, loss_fn):
    task = _task(split)
    model = _model(split.num_items, **DELAYED)
    batch, rng = _batch(task), jax.random.key(3)

    def raw_losses(m, step):
        _, metrics = loss_fn(nnx.clone(m), {**batch, "quantizer_step": jnp.int32(step)}, rng)
        return float(metrics["any_rating/raw_loss"]), float(metrics["any_rating/quantized_loss"])

    before = raw_losses(model, 0)
    tcfg = TrainConfig(
        batch_size=32, num_epochs=10, learning_rate=5e-3, progress=False, ks=(10,), eval_batch_size=64,
        patience=0, eval_every_epochs=5, checkpoint_every_epochs=0,
    )  # fmt: skip
    trainer = Trainer(model, task, tcfg, tmp_path)
    results = trainer.fit()
    trained = trainer.eval_model()
    steps = results["steps"]
    assert steps == 10 * task.num_train_batches() and int(trained.quantizer.step[...]) == steps - 1
    after = raw_losses(trained, steps)
    assert after[0] < before[0] - 0.05, (before, after)
    # The quantized embeddings score almost as well as the raw ones, and better than the untrained raw ones.
    assert after[1] < before[0] - 0.05 and abs(after[1] - after[0]) < 0.5, (before, after)
    test = results["test"]
    assert test["rq/active_levels"] == 2 and test["rq/min_used"] > 0.25 and test["rq/relative_error"] < 1.0
    assert test["hr@10"] > 10 / 60, test  # above chance
    codes = np.asarray(trained.item_codes())
    assert codes.shape == (61, 2, 2) and codes.min() >= 0 and codes.max() < 4


def test_experiment_config_validates():
    from experiments import train_lib
    from experiments.configs import mfli_ml1m, mfli_ml100k, mfli_tiny

    for module in (mfli_tiny, mfli_ml1m, mfli_ml100k):
        config = module.get_config()
        train_lib.check_model_config(config)
        assert config.model.name == "mfli"
    config = mfli_tiny.get_config()
    config.task.unknown = 1
    with pytest.raises(ValueError, match=r"task: unknown settings \['unknown'\] for model 'mfli'"):
        train_lib.check_model_config(config)


def test_bad_input_is_rejected_naming_the_argument(split):
    with pytest.raises(ValueError, match="mfli.encoder: expected one of"):
        MFLIConfig(num_items=10, encoder="bert4rec")
    with pytest.raises(ValueError, match=r"mfli.encoder_options: unknown sasrec fields \['attention_dim'\]"):
        MFLIConfig(num_items=10, encoder_options={"attention_dim": 8})
    assert MFLIConfig(num_items=10, encoder="hstu", encoder_options={"attention_dim": 8}).encoder_options == (
        ("attention_dim", 8),
    )
    with pytest.raises(ValueError, match="quantizer.codebook_size: expected >= 2"):
        MFLIConfig(num_items=10, codebook_size=1)
    with pytest.raises(ValueError, match="mfli.codebook_size: .* expected <= num_items=10, got 64"):
        MFLI(MFLIConfig(num_items=10), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="label_weights: unknown label type 'clicks'"):
        _task(split, labels=(("clicks", 1.0),))
    with pytest.raises(ValueError, match=r"label_weights\['next_item'\]: expected a weight >= 0"):
        _task(split, labels=(("next_item", -1.0),))
    with pytest.raises(ValueError, match="label_weights: expected at least one label type"):
        _task(split, labels=())
    unrated = dataclasses.replace(split.dataset, ratings=None)
    with pytest.raises(ValueError, match="label_weights: label type 'rating_ge_4' needs ratings"):
        _task(leave_one_out(unrated), labels=(("rating_ge_4", 1.0),))
    with pytest.raises(ValueError, match="train.loss.name: MFLI trains with 'sampled_softmax'"):
        MFLITask(split, max_len=MAX_LEN, batch_size=32, loss=LossConfig(name="bce"))
    with pytest.raises(TypeError, match="MFLITask trains an MFLI model, got SASRec"):
        _task(split).check_model(SASRec(_model(split.num_items).encoder.config, rngs=nnx.Rngs(0)))
