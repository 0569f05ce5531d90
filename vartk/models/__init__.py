"""Token transformers: next-scale (vartk.models.var) and next-token (vartk.models.gpt)."""
