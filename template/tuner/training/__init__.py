"""Fine-tuning: the precision policy, the Olive config, a run's bookkeeping, its progress bar, the
held-out evaluation and the general-ability benchmarks."""
