"""Plain torch models: rerankers, the hybrid-expert adaptor, losses and metrics."""
