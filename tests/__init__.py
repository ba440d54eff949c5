"""fedgan test suite."""
