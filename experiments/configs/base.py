"""Shared pieces of every experiment config (a config file's ``get_config()`` starts from these).

Any field can be overridden on the command line: ``--config.train.num_epochs=3``; an unknown key is an error.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def data_config(name: str = "synthetic", max_len: int = 200) -> ml_collections.ConfigDict:
    # name: a recjax.data.registry name: "synthetic" | "ml-1m" | "ml-100k" | "file" | "auto" (ml-1m when
    # RECJAX_DATA_DIR has it, else synthetic) | one you registered. path/format/file: only for "file".
    return ml_collections.ConfigDict(
        {
            "name": name,
            "max_len": max_len,
            "pipeline": "grain",  # "grain" | "numpy" (same batches; numpy where grain is not installed)
            "synthetic": {"num_users": 2000, "num_items": 1000, "seed": 0},
            "path": "",  # interaction file (gzip read transparently)
            "format": "csv",  # "csv" | "tsv" | "pairs" | "sequences" (docs/DATA.md, "Your own data")
            "file": {
                # csv/tsv header names; timestamp "" = none (file order)
                "columns": {"user": "user", "item": "item", "timestamp": "timestamp", "rating": "rating"},
                "min_rating": config_dict.placeholder(float),  # None = keep all ratings
                "user_core": 0,  # k-core: drop users / items with fewer interactions, repeatedly
                "item_core": 0,
            },
        }
    )


def sasrec_model(**overrides) -> ml_collections.ConfigDict:
    # generative-recommenders' MovieLens-1M SASRec: d=50, 2 blocks, 1 head, dropout 0.2, L2-normalised.
    cfg = {
        "name": "sasrec",
        "ffn": "dense",  # or "moe" (MoEBlaze layer; its options in ffn_options, see sasrec_moe_ml1m.py)
        "embed_dim": 50,
        "num_blocks": 2,
        "num_heads": 1,
        "dropout": 0.2,
        "l2_normalize": True,
    }
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def hstu_model(**overrides) -> ml_collections.ConfigDict:
    # generative-recommenders ML-1M HSTU (hstu-sampled-softmax-n128-final.gin): d=50, 2 blocks, 1 head,
    # attention and linear dim 50.
    cfg = {
        "name": "hstu",
        "embed_dim": 50,
        "num_blocks": 2,
        "num_heads": 1,
        "attention_dim": 50,
        "linear_dim": 50,
        "dropout": 0.2,
        "l2_normalize": True,
    }
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def lime_model(**overrides) -> ml_collections.ConfigDict:
    # LIME (recjax/models/lime.py) at our HSTU's size: d=50, 2 layers, 1 head, dqk = dv = 50; 16 links.
    cfg = {
        "name": "lime",
        "attention": "xor",  # "xor" (LIME-XOR) or "mha" (LIME-MHA)
        "num_links": 16,
        "embed_dim": 50,
        "num_layers": 2,
        "num_heads": 1,
        "attention_dim": 50,
        "linear_dim": 50,
        "ffn_hidden_dim": 50,
        "dropout": 0.2,
        "contextualize": True,  # links + MLP(user features); the dataset must have user features
        "scorer": "dot",  # "dot" (cosine) or "mlp"
        "l2_normalize": True,
    }
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def lime_task(**overrides) -> ml_collections.ConfigDict:
    # LimeNextItemTask: (prefix -> next item) requests per training sequence and step; 0 = every position.
    cfg = {"cuts_per_sequence": 0}
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def mfli_model(**overrides) -> ml_collections.ConfigDict:
    # MFLI (recjax/models/mfli.py): a SASRec user tower at our ML-1M size (d=50, 2 blocks, 1 head) and a
    # residual quantizer of 3 facets x 2 levels x 64 codes; see docs/MFLI.md for the fields.
    cfg = {
        "name": "mfli",
        "encoder": "sasrec",  # "sasrec" | "hstu"
        "embed_dim": 50,
        "num_blocks": 2,
        "num_heads": 1,
        "dropout": 0.2,
        "l2_normalize": True,
        "num_facets": 3,
        "num_levels": 2,
        "codebook_size": 64,
        "commitment_weight": 0.25,
        "start_step": 0,  # delayed start: no quantizer (and no quantized loss) before this step
        "level_schedule": (),  # step at which each level activates; () = by level_interval
        "level_interval": 0,  # no schedule: level l activates at start_step + l * level_interval
        "usage_penalty": 0.1,
        "usage_decay": 0.99,
        "facet_projection": True,
        "kmeans_iterations": 10,
    }
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def mfli_serving(**overrides) -> ml_collections.ConfigDict:
    # After training, experiments.run (and so experiments.sweep) evaluates MFLI serving on the test users
    # beside brute force and IVF at equal candidate count (experiments/mfli_experiment.py) and adds
    # mfli_recall@k, ivf_recall@k, brute_recall@k, cold recalls and candidate counts to the test metrics.
    # rebalance=False: the codes' clusters as trained (no split, no merge: the split/merge ablation).
    cfg = {
        "rebalance": True,
        "upper": 64,  # split clusters above this size
        "lower": 4,  # merge clusters below this size
        "k_clusters": 8,  # clusters selected per facet
        "candidates": 2048,  # candidate buffer (raised to the list length K')
        "ivf_clusters": 64,
        "cold": 0.2,  # fraction of items counted as cold
    }
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def mfli_task(**overrides) -> ml_collections.ConfigDict:
    # MFLITask: per label type weights of the (raw + quantized) sampled softmax; quantized_weight scales the
    # quantized-embedding term.
    cfg = {"label_weights": {"next_item": 1.0}, "quantized_weight": 1.0}
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def train_config(**overrides) -> ml_collections.ConfigDict:
    # Sampled softmax, 128 uniform negatives, temperature 0.05, AdamW lr 1e-3 (generative-recommenders).
    cfg = {
        "batch_size": 128,
        "num_epochs": 100,
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "b1": 0.9,
        "b2": 0.98,
        "warmup_steps": 0,
        "grad_clip_norm": 0.0,
        "seed": 0,
        "eval_every_epochs": 1,
        "patience": 10,
        "early_stop_metric": "ndcg@10",
        "checkpoint_every_steps": 0,  # 0: none inside an epoch
        "checkpoint_every_epochs": 1,  # 0: none at epoch ends (both 0: checkpoints off)
        "nonfinite": "error",  # a non-finite loss/gradient stops the run naming the step; "skip": count it
        "donate": True,
        "max_train_seconds": 0.0,  # 0: no wall-clock budget (see TrainConfig)
        "eval_batch_size": 256,
        "ks": (10, 50, 200),
        "num_devices": 0,
        "eval_impl": "auto",
        "progress": True,
        "loss": {
            "name": "sampled_softmax",
            "num_negatives": 128,
            "negatives": "uniform",
            "temperature": 0.05,
        },
    }
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def experiment(data, model, train, provenance: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": data, "model": model, "train": train, "provenance": provenance})
