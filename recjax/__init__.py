"""recjax: large-scale recommendation systems in JAX/Flax NNX with Pallas GPU kernels.

Layers (bottom to top): ``validation`` -> ``pallas_kernels`` -> ``ops`` -> ``data``, ``sharding`` ->
``layers``, ``embeddings``, ``retrieval`` -> ``eval`` -> ``train`` -> ``models`` -> ``experiments``
(tests/test_import_layers.py keeps it true). See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
