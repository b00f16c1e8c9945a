"""The policy LLM, shared by both pipelines: chat prompts, generation (vLLM and transformers),
LoRA, DPO, SFT, online RL and the LLM reward model."""
