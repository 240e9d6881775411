"""Training: SFT on TRL's SFTTrainer and the fault-tolerance layer it plugs in (checkpointing, preemption)."""
