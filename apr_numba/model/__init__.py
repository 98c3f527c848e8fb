"""A loaded decoder: hyper-parameters, packed weights, tokenizer, chat template, and the Model handle with
load().
"""
