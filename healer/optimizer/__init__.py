"""Self-optimisation: apply the candidate changes most likely to help, measure them, keep or roll back."""
