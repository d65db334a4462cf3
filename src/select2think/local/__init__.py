"""S2T-Local: the SLM scores its own top-K candidates with 16 reserved vocabulary rows."""
