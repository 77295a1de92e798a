"""Subcommands: tune (filled by its owner)."""


def register(sub):
    pass
