"""Fault injection end to end: scoring and the preference build against a faulty judge double."""
