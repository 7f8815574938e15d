"""Benchmarks: measured evidence for the project's goals, run by `nas bench ...`.
Each prints a table and writes JSON into its run folder."""
