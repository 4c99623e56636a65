"""Compute kernels behind kvtier's codecs.

:mod:`kvtier.kernels.quant` holds the pure-torch reference kernels; an accelerated
kernel must reproduce their output byte for byte.
"""
