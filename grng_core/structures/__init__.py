"""Curvature structures (ALGORITHMS.md §2): kfac, diagonal, woodbury."""
