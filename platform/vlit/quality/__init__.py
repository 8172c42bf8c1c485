"""Quality control of synthetic data (the VLIT review, section 4.2.3)."""
