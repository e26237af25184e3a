"""Beyond one device: memory planning, launching with torchrun, and the strategies of AdvancedMultiGPUTrainer."""
