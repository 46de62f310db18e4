"""nnU-Net trainers (filled by the ALL U-KAN issue)."""
