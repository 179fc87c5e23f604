"""Precision-ablation experiments: a spec of config axes, run cell by cell, summarized."""
