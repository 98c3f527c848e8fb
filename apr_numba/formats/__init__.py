"""Model file formats: GGUF (reader, header validation), aprender's .apr v2 container, HF safetensors
directories, and import between them.
"""
