"""The data CLI: make-shards, synthetic, precompute-embeddings, inspect, verify."""
