"""Local sufficiency: where the LLM's choice lies in the SLM's ranking."""
