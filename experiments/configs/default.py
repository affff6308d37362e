"""The main job: SASRec, leave-one-out, full-corpus ranking, on MovieLens-1M when RECJAX_DATA_DIR holds it,
otherwise on the embedded synthetic dataset.

Command: python -m experiments.run --config=experiments/configs/default.py
Results: see benchmarks/RESULTS.md ("Foundation") for the measured metrics, machine and wall time.
"""

from experiments.configs import base


def get_config():
    return base.experiment(base.data_config("auto"), base.sasrec_model(), base.train_config())
