"""The fill as a library: :mod:`svdfill.fill.export` (the block-by-block Parquet export job,
:func:`~svdfill.fill.export.export_fill`) and :mod:`svdfill.fill.shard` (one item shard of a
model answering per-block top-k requests, :class:`~svdfill.fill.shard.ItemShard`). The tensor
math is :mod:`svdfill.kernels.fill`; item shards on other processes are driven by
:mod:`svdfill.distributed.sharded_fill`."""
