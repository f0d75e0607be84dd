"""What a run costs and how well it answers: FLOPs (asap flops), time and memory (asap profile), accuracy (asap eval)."""
