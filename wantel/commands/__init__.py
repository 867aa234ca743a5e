"""``wantel`` subcommands that need only the log and projections."""
