"""MFLI on MovieLens-1M (sequential form), one label type (next item): leave-one-out, full-corpus ranking by
the raw item embeddings, the same split, protocol and training recipe as sasrec_ml1m.py (d=50, 2 blocks,
1 head, sampled softmax with 128 uniform negatives, temperature 0.05, AdamW lr 1e-3, b2 0.98, batch 128,
101 epochs, best validation NDCG@10 kept). MFLI-specific: a residual quantizer of 3 facets (each its own
linear projection) x 2 levels x 64 codes co-trained on the quantized embeddings (quantized_weight 1),
delayed start at step 500 (~10 epochs of 48 steps; k-means of level 0 there), level 1 from step 1000,
usage penalty 0.1.

Command: python -m experiments.run --config=experiments/configs/mfli_ml1m.py
  HSTU tower: --config.model.encoder=hstu; no delayed start, all levels at once: --config.model.start_step=0
  --config.model.level_interval=0; 1 facet: --config.model.num_facets=1; levels: --config.model.num_levels=3.
Reached: not run yet (see docs/MFLI.md, "Status").
"""

from experiments.configs import base


def get_config():
    model = base.mfli_model(start_step=500, level_interval=500)
    config = base.experiment(base.data_config("ml-1m"), model, base.train_config(num_epochs=101, patience=20))
    config.task = base.mfli_task()
    config.serving = base.mfli_serving()  # serving recall beside brute force / IVF after training
    return config
