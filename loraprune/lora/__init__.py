"""LoRA adapters and training with them: what LoRAPrune's criterion and schedule, and every recovery, build on."""
