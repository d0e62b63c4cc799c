"""More than one process: process groups, DDP trainer pieces, item sharding, Ray actors, cross-shard merge."""
