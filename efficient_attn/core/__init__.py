"""The engine layer: everything the methods share, importing nothing above it.

* ``api``: ``ea.attention`` / ``ea.attention_weights``: validation of shapes,
  options and features, then dispatch through the registry.
* ``registry``: the method records (what a method supports, its options, arrays,
  ring kernels, recurrent form) and ``register_method``; ``capabilities``: the
  records a method declares (features, array options, recurrent and native forms).
* ``masking``: bottom-right causal, ``kv_lengths``, GQA grouping, padding to
  tiles, dropout: written once.
* ``mods``: the ``mask_mod`` / ``score_mod`` library (``ea.mods``).
* ``blockmask``: block masks: which tiles are empty, partial or full.
* ``engine``: the tile engine (FlashAttention-2 in pure JAX over a block mask)
  and its ring kernels.
* ``reference``: float64 NumPy references; ``recurrent``: decoding by state;
  ``chunked``: the chunked form of the linear recurrences; ``patterns``:
  rendering sparsity patterns.

See ``docs/architecture.md`` for the layers above this one.
"""
