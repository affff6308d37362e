"""MFLI on MovieLens-100K with two label types: "any_rating" (every next item is a positive) and
"rating_ge_4" (a positive only when the user rated it >= 4), weighted 1 and 1; the rest as mfli_ml1m.py
(ML-100K is ~10x smaller: 943 users -> 8 steps per epoch at batch 128, so the quantizer starts at step 80
and level 1 at step 160, ~10 and ~20 epochs).

Command: python -m experiments.run --config=experiments/configs/mfli_ml100k.py
Reached: not run yet (see docs/MFLI.md, "Status").
"""

from experiments.configs import base


def get_config():
    model = base.mfli_model(start_step=80, level_interval=80, codebook_size=32)
    config = base.experiment(
        base.data_config("ml-100k"), model, base.train_config(num_epochs=201, patience=20)
    )
    config.task = base.mfli_task(label_weights={"any_rating": 1.0, "rating_ge_4": 1.0})
    config.serving = base.mfli_serving()  # serving recall beside brute force / IVF after training
    return config
