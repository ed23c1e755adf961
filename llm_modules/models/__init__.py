"""The models: the composed model (large -> bridge -> small -> head), its config and heads, the frozen large
side (loading, identity, tapping), the vocabulary map, model specs, plain (non-composed) models, and the
rules of a saved folder."""
