"""Handlers of the sdeseg subcommands (one module each)."""
