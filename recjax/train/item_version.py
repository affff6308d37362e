"""A version tag for state derived from the parameters (an item-side cache, say), which the cache
remembers so that scoring a stale cache is refused instead of silently wrong.

The tag is an identity, not a step counter: it starts at a 32-bit value from the host's entropy (not from
the model's seed: two runs of one seed with another learning rate or data must not share tags) and every
optimizer step advances it through a fixed bijection of uint32, so two models share a tag only by a 32-bit
coincidence (probability about steps / 2^32), and a model shares it with none of its own earlier states
before 2^32 steps. The
``Trainer`` advances every ``ItemVersion`` of the model after each finite step (a non-finite step keeps
the parameters and the tag) and keeps the tag with its best parameters; a hand-written training loop
calls :func:`advance_item_versions` after each update.
"""

from __future__ import annotations

import secrets

import jax
import jax.numpy as jnp
from flax import nnx

# The Numerical Recipes 32-bit LCG: an odd multiplier makes the map a bijection (no two tags collapse onto
# one), and multiplier - 1 divisible by 4 with an odd increment gives the full period 2^32.
_MUL, _INC = 1664525, 1013904223


class ItemVersion(nnx.Variable):
    """uint32 tag of the parameters' current version; see the module docstring."""


def new_item_version() -> ItemVersion:
    """A fresh tag (host entropy; the model's parameters and their seed are not touched)."""
    return ItemVersion(jnp.asarray(secrets.randbits(32), jnp.uint32))


def next_tag(tag: jax.Array) -> jax.Array:
    return tag * jnp.uint32(_MUL) + jnp.uint32(_INC)  # wraps mod 2^32


def advance_item_versions(model: nnx.Module) -> None:
    """Advances every ``ItemVersion`` inside ``model`` (after the parameters changed)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, ItemVersion):
            node[...] = next_tag(node[...])
