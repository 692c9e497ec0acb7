"""The ML of Agent Forge: plain PyTorch + transformers, no Prefect, testable alone."""
