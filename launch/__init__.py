"""Entry points: the `svdfill` CLI, torchrun entry, `ray job submit` entry, config loading."""
