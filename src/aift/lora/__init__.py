"""LoRA in one place, as PEFT keeps one folder per method: ``model.py`` puts adapters on a model (peft's
LoraConfig from ours, the trainable wrapper, bf16 frozen bases) and loads saved ones; ``layer.py`` is the
fused LoRA linear layer peft builds for plain ``nn.Linear`` targets. The settings are ``aift.config.LoRAConfig``;
merging an adapter into its base is ``aift.export.merge``.
"""
