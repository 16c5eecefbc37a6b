"""Wire models of the OpenAI chat API with OpenRouter's extensions. Nothing else."""
