"""Training: the run config, the one loop every method plugs into, atomic checkpoints, the objectives
(one per method) and the training report."""
