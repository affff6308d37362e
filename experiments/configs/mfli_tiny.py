"""MFLI on the small synthetic dataset in seconds (the tests, smoke checks); the recipe of mfli_ml1m.py at
toy size, with the two rated label types of mfli_ml100k.py (the synthetic data has ratings): a SASRec tower
(d=16, 1 block), 2 facets x 2 levels x 8 codes, the quantizer starting at step 16 (k-means of level 0), level
1 at step 32.
Command: python -m experiments.run --config=experiments/configs/mfli_tiny.py
"""

from experiments.configs import base, synthetic_tiny


def get_config():
    config = synthetic_tiny.get_config()
    config.model = base.mfli_model(
        embed_dim=16,
        num_blocks=1,
        dropout=0.1,
        num_facets=2,
        num_levels=2,
        codebook_size=8,
        start_step=16,
        level_interval=16,
        kmeans_iterations=5,
    )
    config.task = base.mfli_task(label_weights={"any_rating": 1.0, "rating_ge_4": 0.5})
    return config
