"""The second pipeline (You et al.): windows and their prompt, title mapping, scoring,
reference recommenders, its stages and report."""
