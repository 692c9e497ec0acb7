"""Shared by every phase: configuration and presets, model sizing, resource checks, gates."""
