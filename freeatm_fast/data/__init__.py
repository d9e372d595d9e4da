"""Data: the shard format (``shards``), loaders, view sampling and the toy world (DESIGN §5–6).

Kept import-free on purpose: ``import freeatm_fast.data`` must stay cheap and must not pull in PIL,
DALI or torch; import the submodule you need (e.g. ``from freeatm_fast.data.shards import ShardWriter``).
"""
