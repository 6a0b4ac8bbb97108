"""Top-level package of ace: AceGRPO for MLE agents in JAX."""
