def generate_batch(*a, **k): raise NotImplementedError
