"""ecgsearch: distributed hyperparameter and lead search for 12-lead ECG deep learning."""

__version__ = "0.1.0"
