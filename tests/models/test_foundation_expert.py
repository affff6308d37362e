"""Foundation–Expert: target-aware embeddings, the multi-task FM, experts on HyperCast TAE."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from fe_fixtures import tiny_dataset  # noqa: E402

from recjax.data import surfaces as S  # noqa: E402
from recjax.data.tae_store import TAEStore, VersionMismatchError  # noqa: E402
from recjax.layers.target_aware import candidate_attention_mask  # noqa: E402
from recjax.models import experts as X  # noqa: E402
from recjax.models import foundation as F  # noqa: E402
from recjax.train.trainer import TrainConfig, Trainer  # noqa: E402


def _fm(data, **kw):
    cfg = F.FoundationConfig(
        num_items=data.num_items,
        num_surfaces=data.surfaces.num_surfaces,
        max_len=data.max_len,
        embed_dim=16,
        num_blocks=2,
        num_heads=2,
        attention_dim=8,
        linear_dim=8,
        **kw,
    )
    return F.FoundationModel(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ml1m_like():
    ds = tiny_dataset()
    return S.SurfaceData(ds, S.genre_surfaces(ds), max_len=12, num_negatives=3)


@pytest.fixture(scope="module")
def ml100k_like():
    ds = tiny_dataset(seed=1)
    return S.SurfaceData(ds, S.occupation_surfaces(ds), max_len=12)


def test_mask_matches_definition():
    valid_h = np.array([[False, True, True, True], [False, False, True, True]])
    valid_c = np.ones((2, 3), bool)
    got = np.asarray(candidate_attention_mask(jnp.asarray(valid_h), jnp.asarray(valid_c)))
    L, T = 4, 7
    for b in range(2):
        for t in range(T):
            for s in range(T):
                if t < L:
                    want = (s <= t and valid_h[b, s]) or s == t
                else:
                    want = (s < L and valid_h[b, s]) or s == t
                assert got[b, t, s] == want, (b, t, s)


def test_tae_of_a_candidate_ignores_the_other_candidates(ml1m_like):
    fm = _fm(ml1m_like, dropout=0.0)
    fm.eval()
    rng = np.random.default_rng(0)
    hist = rng.integers(1, 41, (3, 12)).astype(np.int32)
    hist[:, :4] = 0
    hmask = hist != 0
    cands = rng.integers(1, 41, (3, 6)).astype(np.int32)
    others = rng.integers(1, 41, (3, 6)).astype(np.int32)
    others[:, 0] = cands[:, 0]
    perm = cands[:, ::-1].copy()
    ones = np.ones((3, 6), bool)
    fwd = nnx.jit(lambda m, *a: m(*a))
    a = np.asarray(fwd(fm, hist, hmask, cands, ones))
    b = np.asarray(fwd(fm, hist, hmask, others, ones))
    c = np.asarray(fwd(fm, hist, hmask, perm, ones))
    pad = np.asarray(fwd(fm, hist, hmask, cands, ones & (np.arange(6) == 0)))  # the others padded away
    np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-5)
    np.testing.assert_allclose(a[:, 0], c[:, -1], atol=1e-5)
    np.testing.assert_allclose(a[:, 0], pad[:, 0], atol=1e-5)
    assert np.abs(a[:, 1] - b[:, 1]).max() > 1e-3  # a different candidate does change its own TAE
    hist2 = hist.copy()
    hist2[:, -1] = hist[:, -1] % 40 + 1
    assert (
        np.abs(np.asarray(fwd(fm, hist2, hmask, cands, ones))[:, 0] - a[:, 0]).max() > 1e-3
    )  # history matters


def test_surfaces_impressions_and_requests(ml1m_like, ml100k_like):
    d = ml1m_like
    tr = d.train_impressions(0, positions_per_user=4)
    neg = tr["label"] == 0
    assert (d.position_of(tr["user"][neg], tr["item"][neg]) < 0).all()  # never rated by the user
    assert (d.surfaces.item_surface[tr["item"]] == tr["surface"]).all()
    assert (tr["cut"] < d.train_len[tr["user"]]).all() and (tr["cut"] >= 1).all()
    ev = d.eval_impressions("test")
    for r in np.unique(ev["row"]):
        m = ev["row"] == r
        assert ev["label"][m].sum() == 1 and len(np.unique(ev["surface"][m])) == 1
        u, t = ev["user"][m][0], ev["cut"][m][0]
        assert t == d.lengths[u] - 1
        seen = set(d.dataset.sequences[u][:t].tolist())
        want = set(d.surface_items[ev["surface"][m][0]].tolist()) - seen
        assert set(ev["item"][m].tolist()) == want
        assert (
            ev["ne"][m].sum() == min(1 + d.num_negatives, m.sum()) and ev["ne"][m & (ev["label"] > 0)].all()
        )
    req = d.requests(ev, 5)
    idx = req["index"][req["candidate_mask"]]
    assert sorted(idx.tolist()) == list(range(len(ev["user"])))
    np.testing.assert_array_equal(req["candidates"][req["candidate_mask"]], ev["item"][idx])
    r2 = ml100k_like.eval_impressions("valid")
    u = r2["user"]
    want = np.asarray([ml100k_like.dataset.ratings[x][-2] >= 4 for x in u], np.float32)
    np.testing.assert_array_equal(r2["label"], want)


def test_metrics_of_known_scores(ml1m_like, ml100k_like):
    ev = ml1m_like.eval_impressions("test")
    m = F.all_surface_metrics(ml1m_like, ev, ev["label"] * 10.0 - 5.0)
    assert m["mean/hr@10"] == 1.0 and m["mean/ndcg@10"] == 1.0
    worst = F.all_surface_metrics(ml1m_like, ev, -ev["label"])
    per_surface = []  # the target last among its row's candidates: rank = number of candidates
    for sf in range(ml1m_like.surfaces.num_surfaces):
        rows = ev["row"][ev["surface"] == sf]
        if len(rows):
            per_surface.append(np.mean(1.0 / np.unique(rows, return_counts=True)[1]))
    assert worst["mean/mrr"] == pytest.approx(np.mean(per_surface))
    ev2 = ml100k_like.eval_impressions("test")
    big = int(np.bincount(ev2["surface"]).argmax())
    assert F.surface_metrics(ml100k_like, ev2, ev2["label"], big)["auc"] == 1.0
    p = ev2["label"].mean()
    assert F.normalized_entropy(
        np.full(len(ev2["label"]), np.log(p / (1 - p))), ev2["label"]
    ) == pytest.approx(1.0)


def test_fm_trains_with_the_trainer_and_hypercast_feeds_an_expert(ml1m_like, tmp_path):
    d = ml1m_like
    task = F.FoundationTask(d, batch_size=16, positions_per_user=4, eval_candidates=16, eval_batch_size=16)
    fm = _fm(d)
    cfg = TrainConfig(
        batch_size=16,
        num_epochs=2,
        eval_every_epochs=1,
        progress=False,
        learning_rate=3e-3,
        checkpoint_every_epochs=0,
    )
    trainer = Trainer(fm, task, cfg, tmp_path / "fm")
    res = trainer.fit()
    assert np.isfinite(res["test"]["mean/ndcg@10"]) and 0 <= res["test"]["mean/hr@10"] <= 1
    fm_best = trainer.best_model()
    # HyperCast: log the FM's TAE for the expert's impressions, version 1
    store = TAEStore(tmp_path / "store", chunk_rows=64)
    store.create_version(1, 16)
    imps = {"train": d.train_impressions(123, positions_per_user=4), **task.eval_imp}
    for name, imp in imps.items():
        F.log_tae(fm_best, d, imp, store.writer(1, name), num_candidates=16, batch_size=16)
    store.seal(1)
    readers = {k: store.reader(1, k, require_sealed=True) for k in imps}
    _, tae = F.fm_infer(fm_best, d.requests(imps["test"], 16), len(imps["test"]["user"]), 16, tae=True)
    np.testing.assert_allclose(
        readers["test"].get(imps["test"]["user"], imps["test"]["item"]), tae, atol=1e-2
    )
    surface = int(np.bincount(imps["train"]["surface"]).argmax())
    et = X.ExpertTask(d, surface, imps, tae=readers, fm_version=1, batch_size=16, eval_batch_size=64)
    expert = X.Expert(et.config_for(embed_dim=8, hidden_dim=16), rngs=nnx.Rngs(1))
    out = Trainer(expert, et, cfg, tmp_path / "expert").fit()
    assert np.isfinite(out["test"]["ndcg@10"]) and np.isfinite(out["test"]["ne"])
    # an expert never mixes two FM versions
    with pytest.raises(VersionMismatchError, match="trained on TAE of FM version 1"):
        X.ExpertTask(d, surface, imps, batch_size=16).start_epoch({"fm_version": jnp.int32(1)})
    with pytest.raises(VersionMismatchError, match="expected TAE of version 2"):
        X.ExpertTask(d, surface, imps, tae=readers, fm_version=2, batch_size=16)


def test_expert_sends_no_gradient_into_the_fm(ml100k_like):
    d = ml100k_like
    fm = _fm(d, dropout=0.0)
    imp = d.train_impressions(0)
    req = {k: v[:4] for k, v in d.requests(imp, 3).items()}
    item_side, user_side = X.side_features(d)
    cfg = X.ExpertConfig(
        num_items=d.num_items,
        tae_dim=16,
        item_side_dim=item_side.shape[1],
        user_side_dim=user_side.shape[1],
        embed_dim=8,
        hidden_dim=8,
    )
    expert = X.Expert(cfg, rngs=nnx.Rngs(2))
    idx = req["index"][:, 0]
    ex = X.expert_examples(d, {k: v[idx] for k, v in imp.items()}, 10, item_side, user_side)

    def joint(fm, expert):  # the expert fed a live FM output: still no gradient reaches the FM
        tae = fm(*(jnp.asarray(req[k]) for k in F.REQUEST_KEYS))[:, 0]
        logits = expert(*(jnp.asarray(ex[k]) for k in X.INPUT_KEYS), tae)
        return jnp.mean((logits - jnp.asarray(ex["label"])) ** 2)

    g_fm, g_ex = nnx.jit(nnx.grad(joint, argnums=(0, 1)))(fm, expert)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(nnx.state(g_fm, nnx.Param)))
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(nnx.state(g_ex, nnx.Param))) > 0


def test_bad_inputs_name_the_argument(ml1m_like):
    d = ml1m_like
    fm = _fm(d)
    h = np.ones((2, 12), np.int32)
    with pytest.raises(ValueError, match="history_BxL: expected shape"):
        fm(np.ones((2, 13), np.int32), np.ones((2, 13), bool), h[:, :3], np.ones((2, 3), bool))
    with pytest.raises(TypeError, match="candidate_mask_BxC: expected bool"):
        fm(h, h != 0, h[:, :3], np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"candidates_BxC: expected values in \[0, 41\)"):
        fm(h, h != 0, np.full((2, 3), 99, np.int32), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="fm.num_blocks: expected > 0"):
        F.FoundationConfig(num_items=5, num_surfaces=2, num_blocks=0)
    with pytest.raises(ValueError, match="groups: unknown genres"):
        S.genre_surfaces(d.dataset, (("x", ("Jazz",)),))
    with pytest.raises(ValueError, match="split: expected 'valid' or 'test'"):
        d.eval_impressions("train")
    with pytest.raises(ValueError, match="tae / fm_version: pass both"):
        X.ExpertTask(d, 0, {"train": {}, "valid": {}, "test": {}}, fm_version=1)
    with pytest.raises(ValueError, match="surface: expected an index"):
        X.ExpertTask(d, 9, {})
    expert = X.Expert(X.ExpertConfig(num_items=40, tae_dim=4, history_len=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tae_BxD: this expert has tae_dim=4"):
        expert(np.ones(2, np.int32), np.ones((2, 2), np.int32), np.zeros((2, 0)), np.zeros((2, 0)))
