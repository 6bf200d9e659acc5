"""The Sana-family model core: pipeline folders, TrigFlow, samplers, the generator, and the embedded world."""
