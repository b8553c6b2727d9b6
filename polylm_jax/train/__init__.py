"""Training: optimizer, the sharded train step, FLOP accounting, the loop and its metrics."""
