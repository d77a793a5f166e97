"""Offline benchmarking for `semiar bench`: built-in prompt sets and loaders."""
