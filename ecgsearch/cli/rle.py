"""Subcommands: rle (filled by its owner)."""


def register(sub):
    pass
