"""From logits to text: sampling (greedy, temperature, top-k, top-p, min-p, repeat penalty), stop rules and the
generation loop.
"""
