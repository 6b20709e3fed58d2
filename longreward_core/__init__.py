"""LongReward scoring engine."""
