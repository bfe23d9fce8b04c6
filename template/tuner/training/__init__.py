"""Fine-tuning: the precision policy, the Olive config, a run's bookkeeping, the held-out evaluation."""
