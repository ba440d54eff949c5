"""Privacy: what a run reveals about its clients' images (the leakage audit)."""
