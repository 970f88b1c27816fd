"""Models: registry and loading, the encode stage, training, report text, zero-shot predictions and scope."""
