"""The tests' name for fedgan_app.local_superlink (a private local SuperLink)."""

from fedgan_app.local_superlink import (  # noqa: F401  (re-exported for the tests)
    FLWR,
    REPO_ROOT,
    LocalFlower,
    alive,
    descendants,
    free_port,
    process_table,
)
