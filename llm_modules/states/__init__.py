"""The large model's hidden states on disk: the store training reads instead of running the large model,
the fence that lets several processes build one store, and its admin (ls / prune)."""
