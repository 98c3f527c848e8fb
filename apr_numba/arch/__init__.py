"""The single description of a decoder architecture: hyper-parameters and block layout (ArchSpec), the ordered
trace stages and the teaching faults attached to them. Every backend, tool and the dashboard read these.
"""
