"""Shared building blocks of the fluke re-identification pipeline; one module per concept."""
