"""Searchers: each proposes Plans and learns from their metrics and costs."""
