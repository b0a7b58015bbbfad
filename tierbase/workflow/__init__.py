"""Workflow kit: the five-state SCM machine with blocking gates, and the opt-in TDD layer."""
