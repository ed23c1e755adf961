"""Speculative decoding: a drafter proposes K tokens per row, the target checks all of them in one pass, and
every row keeps the longest prefix the target agrees with plus one token of the target's own.

The output is the target's: greedy rows give exactly the tokens the target gives alone (up to float
rounding of a K+1-token pass against 1-token passes, exact in float64), and sampled rows follow the
target's distribution after its processors (temperature, top-k, top-p, repetition penalty...), by the
standard rule (Leviathan et al. 2023; Chen et al. 2023): draft d with drafter probability q(d) is kept
with probability min(1, p(d) / q(d)); at the first rejection the row samples from the normalised
positive part of p - q; when all K are kept it samples its extra token from p.

The drafter proposes and learns which tokens were kept (`Proposer`); the target is any causal LM run
through a `TargetStepper` that also returns the hidden states a drafter reads; the rows, their caches
and their rollback past rejected tokens are `SpeculativeBatch`'s, which decodes like
`engine.DecodeBatch` (rows join between steps, leave when done), so generate, chat, eval and serve
take it in its place.

The package, laid out as vLLM's `v1/spec_decode/` (proposers) beside its `rejection_sampler.py`:
`proposer` (the `Proposer` interface a proposer implements), `composed_proposer` (the composed model as a
proposer: its runtime; the draft network itself is `llm_modules.models.composed`), `prompt_lookup` (drafts
copied from the row's own context, no network), `lookup_first` (per row, prompt lookup's copy where the
context holds an n-gram match, the drafter's drafts elsewhere), `acceptance` (the
rules that keep drafts), `target` (the target's stepper and the rollback of its caches), `batch` (the rows
that decode speculatively). Draft trees (their masks and acceptance) go here too.
"""
