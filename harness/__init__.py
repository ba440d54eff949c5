"""Test and benchmark harness: hostile payloads (not shipped in the app package)."""
