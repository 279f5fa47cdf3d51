"""sagfast's benchmark suite: `python -m bench SCENARIO [--quick] [--out DIR]` and
`pytest bench/ --benchmark-only` (see bench/__main__.py and docs/performance.md)."""
