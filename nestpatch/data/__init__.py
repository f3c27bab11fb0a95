"""Prompt sources: files and named sets."""
