"""Packaged data files for the built-in tasks (e.g. python_functions.jsonl for "coding")."""
