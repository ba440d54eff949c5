"""Data: the dataset settings (spec), their preparation (sources) and the cache (prepared)."""
