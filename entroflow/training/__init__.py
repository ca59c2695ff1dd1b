"""RL training on TRL's GRPOTrainer: rewards, MaxEnt-GRPO, per-step entropy traces, the step probe."""
