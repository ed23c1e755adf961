"""Speculative decoding: proposers draft tokens for each row as a tree (a drafter's chain, its runners-up,
prompt lookup's copy; a chain is a tree of width 1), the target checks every node in one pass, and every row
keeps the longest path the target agrees with plus one token of the target's own.

The output is the target's: greedy rows give exactly the tokens the target gives alone (up to float
rounding of a many-token pass against 1-token passes, exact in float64), and sampled rows follow the
target's distribution after its processors (temperature, top-k, top-p, repetition penalty...), by
recursive rejection sampling over each node's candidates (`acceptance`; for a chain, the standard rule of
Leviathan et al. 2023 and Chen et al. 2023).

A proposer proposes and learns which tokens were kept (`Proposer`); the target is any causal LM run
through a `TargetStepper` that also returns the hidden states a drafter reads; the rows, their caches
and their rollback past rejected tokens are `SpeculativeBatch`'s, which decodes like
`engine.DecodeBatch` (rows join between steps, leave when done), so generate, chat, eval and serve
take it in its place.

The package, laid out as vLLM's `v1/spec_decode/` (proposers) beside its `rejection_sampler.py`:
`proposer` (the `Proposer` interface a proposer implements), `composed_proposer` (the composed model as a
proposer: its runtime; the draft network itself is `llm_modules.models.composed`), `prompt_lookup` (drafts
copied from the row's own context, no network), `tree` (a row's draft tree: what one verify pass checks; a
chain is a tree of width 1), `tree_proposer` (a drafter's chain, its runners-up and prompt lookup's copy in
one tree), `policy` (how much to draft per pass and row so that drafting pays at the batch's size),
`acceptance` (the rules that keep a tree's longest agreed path), `target` (the target's stepper over a tree
and the rollback of its caches to the kept path), `batch` (the rows that decode speculatively).
"""
