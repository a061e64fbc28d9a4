"""redistill: distil a teacher LLM's relation triples into a small student model."""
