"""Data layer: PTB-XL reading, synthetic PTB-XL, and the prepared cache.

Later layers read data only through `ECGCache` (see docs/ARCHITECTURE.md).
"""
from ecgsearch.data.cache import ECGCache, cache_info, load_cache, prepare
from ecgsearch.data.errors import DataError
from ecgsearch.data.ptbxl import (SplitConfig, clean_ages, label_matrix, read_database, read_record,
                                  read_statements)
from ecgsearch.data.signal import pad_or_crop, pick_leads, read_any_record, resample
from ecgsearch.data.synth import synthesize

__all__ = ["DataError", "ECGCache", "SplitConfig", "cache_info", "clean_ages", "label_matrix",
           "load_cache", "pad_or_crop", "pick_leads", "prepare", "read_any_record",
           "read_database", "read_record", "read_statements", "resample", "synthesize"]
