"""BERT-family sentence encoders (safetensors directories): weights, forward and pooled embeddings.
"""
