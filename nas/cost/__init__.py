"""Cost models: what a plan costs in bytes, BitOps or latency."""
