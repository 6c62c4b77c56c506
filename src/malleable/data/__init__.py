"""Datasets: local files, the offline real datasets, synthetic QA."""
