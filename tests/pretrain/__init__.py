"""Tests of the pretraining maths (losses, centering, heads, masks, schedules, EMA, optimiser groups)."""
