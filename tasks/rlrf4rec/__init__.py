"""The RLRF4Rec pipeline: reranking lists, KAR prompts, encoding, reranker, reward, Table I."""
