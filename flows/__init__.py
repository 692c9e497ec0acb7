"""WHAT runs, in which order: one flow per phase, and full.py (flow "agent-forge")."""
