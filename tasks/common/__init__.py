"""Shared plumbing: atomic writes, hashing, the stage mechanism, the run lock, memory release."""
