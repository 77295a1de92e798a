"""Subcommands: train (filled by its owner)."""


def register(sub):
    pass
