"""Procedures that drive the verbs: the forget benchmarks' protocols (train a model family, unlearn, score
against the retrained model), the adapter zoo the merge benchmarks train and score, and the audit with its
relearning attack.

This layer sits above the verbs (it may import `forget`, `learn` and the other verbs; `api` imports it, not the
other way round); no verb and nothing in `evaluate/` imports it. A new verb's benchmark protocol goes here.
"""
