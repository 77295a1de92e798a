"""Subcommands: data (filled by its owner)."""


def register(sub):
    pass
