"""Attention layout of a target-aware foundation model (Foundation–Expert, arXiv 2508.02929): a left-padded
history followed by C candidate tokens in one sequence of length L + C.

- :func:`candidate_attention_mask`: history positions are causal (they never see a candidate); candidate c
  sees every valid history position and itself, never another candidate. A candidate's output is therefore
  a function of (history, that candidate) only, whatever else is in the request.

Letters: B batch, L history length, C candidates, T = L + C tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def candidate_attention_mask(valid_history_BxL: jax.Array, valid_candidates_BxC: jax.Array) -> jax.Array:
    """(B, T, T) bool. [b, t, s]: history query t sees key s <= t when s is a real item (or s == t);
    candidate query t sees every real history key and itself."""
    B, L = valid_history_BxL.shape
    C = valid_candidates_BxC.shape[1]
    T = L + C
    eye_TxT = jnp.eye(T, dtype=bool)
    hist_key_T = jnp.arange(T) < L
    causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
    # history rows: causal over history keys; candidate rows: all history keys (never other candidates)
    rows_hist_T = jnp.arange(T) < L
    structure_TxT = jnp.where(rows_hist_T[:, None], causal_TxT, True) & hist_key_T[None, :]
    key_valid_BxT = jnp.concatenate([valid_history_BxL, jnp.zeros((B, C), bool)], axis=1)
    return (structure_TxT[None] & key_valid_BxT[:, None, :]) | eye_TxT[None]
