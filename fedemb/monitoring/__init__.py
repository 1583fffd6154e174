"""Callbacks around the round loop: TensorBoard, progress bar, checkpoints."""
