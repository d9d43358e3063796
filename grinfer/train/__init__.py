"""Training and evaluation loops that produce checkpoints and quality numbers (never imported by serving)."""
