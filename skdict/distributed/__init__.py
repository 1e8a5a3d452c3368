"""Scale-out on existing engines, used through the same estimators.

* :mod:`skdict.distributed.dask`: ``dask.array`` input and output (blockwise
  transform, tree-reduced statistics for the dictionary learners);
* :mod:`skdict.distributed.torch`: ``torch.distributed`` data parallelism for
  the gradient-trained estimators (all-reduced gradients and counters);
* :mod:`skdict.distributed.stats`: the one interface both engines sum
  (statistics that add up with ``+``).

Nothing here is imported by ``import skdict``: dask is an optional extra.
"""
