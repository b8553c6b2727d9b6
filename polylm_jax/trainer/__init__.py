"""The training engine: the sharded train step (step.py, loss.py), the loop and its metrics
(loop.py, metrics.py), loss-spike handling (spikes.py), FLOP and memory accounting (flops.py,
memory_report.py). It never imports evaluation or the commands: they plug in from above."""
