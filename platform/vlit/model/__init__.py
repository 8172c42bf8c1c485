"""Models for vision-language instruction tuning: tokenizers, processors, tiny LLaVA."""
