"""Naive oracles: direct transcriptions of the semantics, loops allowed, for tests only."""
