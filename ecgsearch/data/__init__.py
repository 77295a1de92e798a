"""Data layer: PTB-XL reading, synthetic PTB-XL, and the prepared cache.

Later layers read data only through `ECGCache` (see docs/ARCHITECTURE.md).
"""
from ecgsearch.data.cache import ECGCache, cache_info, load_cache, prepare
from ecgsearch.data.errors import DataError
from ecgsearch.data.ptbxl import (SplitConfig, clean_ages, label_matrix, read_database, read_record,
                                  read_statements)
from ecgsearch.data.signal import pad_or_crop, pick_leads, read_any_record, resample

__all__ = ["DataError", "ECGCache", "SplitConfig", "cache_info", "clean_ages", "label_matrix",
           "load_cache", "pad_or_crop", "pick_leads", "prepare", "read_any_record",
           "read_database", "read_record", "read_statements", "resample", "synthesize"]


def __getattr__(name: str):
    # The generator pulls in scipy.signal (about 40 MB and 0.6 s per process): a training process
    # reading a prepared cache never needs it, so it is loaded when first asked for.
    if name == "synthesize":
        from ecgsearch.data.synth import synthesize
        return synthesize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
