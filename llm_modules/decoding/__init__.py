"""Decoding: the continuous-batching engine, sampling options, per-model cache steppers and `generate`;
the one path that generate, chat, eval, serve and lm-eval share."""
