from latentlm.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "Transformer"]
