"""slim: make a model cheaper to run (issue 16). KV-cache eviction policies (evict.py) so far."""
