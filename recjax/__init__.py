"""recjax: large-scale recommendation systems in JAX/Flax NNX with Pallas GPU kernels.

Layers (bottom to top): ``pallas_kernels`` -> ``recjax.ops`` -> building blocks (``data``, ``embeddings``,
``layers``, ``retrieval``, ``sharding``, ``train``, ``eval``) -> ``recjax.models`` -> ``experiments``.
See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
