"""Shared test helpers: tiny random models, K-quant writers, reference runs and live servers."""
