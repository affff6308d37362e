"""experiments/mfli_experiment.py --small: trains MFLI on the tiny config, builds the index from the best
model and reports recall of MFLI / brute force / IVF. Checks: brute force equals recjax.eval.ranking's HR@k
on the same model, recall is a fraction nondecreasing in k (cold recall too), IVF runs at MFLI's candidate
count, split/merge respects the upper bound, the outputs are written."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import mfli_experiment as mx
from recjax.eval import ranking


@pytest.mark.slow
def test_mfli_experiment_small(tmp_path):
    a = mx.parse_args(["--small", "--workdir", str(tmp_path)])
    (run,) = mx.run(a)
    r = run.result
    assert r["users"] == 1000 and 0 < r["cold_users"] < r["users"]
    assert r["active_levels"] >= 1
    for m in mx.METHODS:
        for prefix in ("recall", "cold_recall"):
            vals = [r[m][f"{prefix}@{k}"] for k in mx.KS]
            assert all(0 <= v <= 1 for v in vals), (m, prefix, vals)
            assert vals == sorted(vals), (m, prefix, vals)
    # brute force through the filtered top-K' lists == ranking's pessimistic-rank HR@k (ties aside)
    graphdef, state = nnx.split(run.model)
    ref = ranking.evaluate(
        lambda b: mx._user_queries(graphdef, state, jnp.asarray(b["inputs"]), jnp.asarray(b["mask"])),
        jnp.asarray(run.model.candidate_embeddings()),
        run.task.eval_batches("test"),
        ks=mx.KS,
        impl="reference",
    )
    for k in mx.KS:
        assert abs(r["brute"][f"recall@{k}"] - ref[f"hr@{k}"]) <= 2 / r["users"], (k, r["brute"], ref)
    # equal candidate count: IVF scans MFLI's mean candidates up to one list (300 items / 16 lists)
    assert abs(r["ivf"]["candidates"] - r["mfli"]["candidates"]) <= 300 / 16
    for facet in r["balance"]:
        assert facet["after"]["max_size"] <= a.upper < facet["before"]["max_size"]
        assert facet["after"]["gini"] < facet["before"]["gini"]
    table = mx.write_outputs(tmp_path, a, [r])
    assert (tmp_path / "table.md").read_text().strip() == table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert np.isclose(saved["per_seed"][0]["mfli"]["recall@50"], r["mfli"]["recall@50"])
    assert all(f"| {m} |" in table for m in mx.METHODS)
    # --merge joins per-seed workdirs (seeds run as parallel processes) and refuses a repeated seed
    other = tmp_path / "other"
    mx.write_outputs(other, a, [{**r, "seed": 7}])
    merged = mx.main(["--workdir", str(tmp_path / "joined"), "--merge", f"{tmp_path},{other}"])
    assert [x["seed"] for x in merged["per_seed"]] == [r["seed"], 7]
    assert "±" in (tmp_path / "joined" / "table.md").read_text()
    with pytest.raises(SystemExit, match="is in more than one"):
        mx.main(["--workdir", str(tmp_path / "j2"), "--merge", f"{tmp_path},{tmp_path}"])


def test_hits_from_lists_excludes_history_but_not_the_target():
    ids = np.array([[5, 3, 7, 9, 0], [2, 4, 6, 8, -1]])
    target = np.array([7, 4])
    exclude = np.array([[5, 7, 0], [8, 0, 0]])  # user 0's target 7 is also in its history: kept
    hits = mx.hits_from_lists(ids, target, exclude, (1, 2, 3), 10)
    # user 0: 5 removed -> [3, 7, 9] -> target at 2; user 1: nothing removed before 4 -> position 2
    assert hits[1].tolist() == [False, False]
    assert hits[2].tolist() == [True, True]
    assert hits[3].tolist() == [True, True]
    miss = mx.hits_from_lists(ids, np.array([1, 1]), exclude, (5,), 10)
    assert miss[5].tolist() == [False, False]


def test_cold_items_fewest_interactions_ties_by_id():
    cold = mx.cold_items([np.array([1, 1, 2, 3]), np.array([2, 4, 5])], 5, 0.4)
    # counts: 1->2, 2->2, 3->1, 4->1, 5->1; the 2 coldest: 3 and 4 (ties by lower id)
    assert np.flatnonzero(cold).tolist() == [3, 4]
