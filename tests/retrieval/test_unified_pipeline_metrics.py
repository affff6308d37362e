"""experiments/silvertorch_pipeline.py: metrics against brute-force definitions, the tower's data (held-out
items, random windows fixed by (seed, epoch)), and (slow, MovieLens-100K) the whole --small run through the
Trainer, resumed from its workdir."""

import json

import numpy as np
import pytest

from experiments.silvertorch_pipeline import WindowTask, auc, main, parse_args, recall_at, tower_split
from recjax.data.types import SequenceDataset


def test_auc_equals_pair_count(rng):
    scores = rng.integers(0, 6, size=40).astype(np.float64)  # many ties
    labels = rng.random(40) < 0.4
    pos, neg = scores[labels], scores[~labels]
    want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert abs(auc(scores, labels) - want) < 1e-12
    assert np.isnan(auc(scores, np.zeros(40, bool)))


def test_recall_at_counts_targets_found():
    ids = np.array([[5, 7, 9, -1], [1, 2, 3, 4]])
    targets = np.array([[7, 8, 0], [4, 0, 0]])  # 0 = padding
    assert recall_at(ids, targets) == (0.5 + 1.0) / 2


def test_small_flag_shrinks_the_run():
    args = parse_args(["--small"])
    assert args.tower_epochs <= 2 and args.k <= 50 and args.n_final <= args.k


def _dataset(lengths, num_items=50, seed=0) -> SequenceDataset:
    r = np.random.default_rng(seed)
    seqs = tuple(r.integers(1, num_items + 1, size=n).astype(np.int32) for n in lengths)
    return SequenceDataset(name="toy", num_items=num_items, sequences=seqs)


def test_tower_split_holds_out_the_next_two_items():
    ds = _dataset([30, 7, 3])
    split = tower_split(ds, holdout=5)
    s = ds.sequences
    np.testing.assert_array_equal(split.train[0], s[0][:25])
    np.testing.assert_array_equal(split.train[1], s[1][:2])  # at least 2 items kept
    np.testing.assert_array_equal(split.train[2], s[2][:2])
    assert split.eval_users.tolist() == [0, 1]  # user 2 has no second held-out item
    assert split.valid_target.tolist() == [s[0][25], s[1][2]]
    assert split.test_target.tolist() == [s[0][26], s[1][3]]
    np.testing.assert_array_equal(split.test_inputs[0], s[0][:26])


def test_window_task_batches_are_random_windows_fixed_by_seed_and_epoch():
    ds = _dataset([30, 12, 1, 40, 5, 9], seed=1)
    task = WindowTask(tower_split(ds, holdout=2), max_len=8, batch_size=4, ks=(10,))
    assert len(task.sequences) == 5 and task.num_train_batches() == 2  # the 1-item user has no pair
    a, b = list(task.train_batches(0, 0)), list(task.train_batches(0, 0))
    assert len(a) == 2
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, task.train_batches(1, 0)))

    def text(ids):  # ",3,1,4," : a contiguous piece of a sequence is a substring
        return "," + "".join(f"{i}," for i in ids)

    train = [text(s) for s in task.sequences]
    rows = 0
    for batch in a:
        assert batch["inputs"].shape == (4, 8)
        for x, t, m in zip(batch["inputs"], batch["targets"], batch["mask"], strict=True):
            if not m.any():  # the padding row of the short last batch
                continue
            rows += 1
            assert (m == (x > 0)).all() and m[-1] and (t[m] > 0).all()
            np.testing.assert_array_equal(t[:-1][m[1:]], x[1:][m[1:]])  # targets are the next inputs
            window = np.concatenate([x[m], t[-1:]])  # a contiguous piece of one training sequence
            assert any(text(window) in s for s in train)
    assert rows == 5  # every user once per epoch


@pytest.mark.slow
def test_small_run_trains_both_stages_and_resumes(data_dir, tmp_path):
    argv = ["--small", "--data-dir", str(data_dir), "--workdir", str(tmp_path / "w"), "--out", str(tmp_path)]
    first = main(argv)
    assert set(first["tower_next_item"]) >= {"hr@10", "ndcg@10", "mrr"}
    assert first["recall"]["pipeline_candidates_equal_exact_topk"]
    assert first["filter_comedy"]["returned_items_violating_filter"] == 0
    assert first["fresh_index"]["results_equal_single_index"]
    assert json.loads((tmp_path / "results.json").read_text())["recall"] == first["recall"]
    for part in ("tower", "scorer"):
        done = json.loads((tmp_path / "w" / part / "results.json").read_text())
        assert done["epochs"] == (2 if part == "tower" else 1)
    # A re-run resumes both finished trainers from their checkpoints: nothing is retrained, same results.
    again = main(argv)
    for key in ("tower_next_item", "value_model", "test_uniform_negatives", "recall", "rerank_by"):
        assert again[key] == first[key], key
    with pytest.raises(ValueError, match="hard: 30 -> 10"):  # a training flag changed: refused
        main([*argv, "--hard", "10"])
