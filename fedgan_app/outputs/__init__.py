"""Outputs: the run folder, checkpoints, the recorder, local files and W&B, the views."""
