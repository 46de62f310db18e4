"""Networks built from nnU-Net plans (filled by the ALL U-KAN issue)."""
