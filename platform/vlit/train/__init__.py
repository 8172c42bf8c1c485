"""Ray Train loops (SFT; DPO reuses the strategy and checkpoints), the DeepSpeed strategy."""
