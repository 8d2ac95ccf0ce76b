"""Reusable pipeline building blocks shared by reelforge steps."""
