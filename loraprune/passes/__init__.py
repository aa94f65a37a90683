"""The passes over the traced program: dependency analysis (one rule per ATen op family), importance criteria,
selection, LoRAPrune's schedule, rewrite, verification."""
